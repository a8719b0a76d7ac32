"""Making webhook certificates: a CA and a serving certificate for 127.0.0.1
(the local test bed), client certificates as an API server would present.

Not imported by the running operator (it reads the chart's files through
:class:`~natsmesh_operator.webhook.tls.ServingCert`): cryptography's x509 and
key modules cost ~8 MB of RSS for code it would never run.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from natsmesh_operator.webhook.tls import ServingCert

logger = logging.getLogger(__name__)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_ca(
    common_name: str, days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, x509.Name]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name}-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return ca_key, ca_cert, ca_name


def make_client_certs(
    directory: Path,
    common_names: list[str],
    *,
    days: int = 365,
    ca_name: str = "natsmesh-webhook-client",
) -> list[ServingCert]:
    """A client CA (``client-ca.crt``) and one client certificate per name
    (``client-<i>.crt``/``.key``, ``CN=<name>``), as the API server would present
    to a webhook; the CA is what
    :class:`~natsmesh_operator.webhook.server.ClientIdentity` trusts."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, ca_cert, issuer = _make_ca(ca_name, days)
    cafile = directory / "client-ca.crt"
    cafile.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out = []
    for i, name in enumerate(common_names):
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        paths = ServingCert(cafile, directory / f"client-{i}.crt", directory / f"client-{i}.key")
        paths.certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths.keyfile.write_bytes(_pem_key(key))
        paths.keyfile.chmod(0o600)
        out.append(paths)
    return out


def make_ca_and_cert(
    directory: Path, hosts: list[str], *, days: int = 365, common_name: str = "natsmesh-webhook"
) -> ServingCert:
    """Write ``ca.crt``, ``tls.crt`` and ``tls.key`` for the given hosts (DNS names or IPs)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, ca_cert, ca_name = _make_ca(common_name, days)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = ServingCert(directory / "ca.crt", directory / "tls.crt", directory / "tls.key")
    paths.cafile.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.keyfile.write_bytes(_pem_key(key))
    paths.keyfile.chmod(0o600)
    logger.info("wrote a webhook CA and serving certificate for %s into %s", hosts, directory)
    return paths
