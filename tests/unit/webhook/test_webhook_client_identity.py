"""Who may call the webhook: the client-certificate name check (ClientIdentity).

The TLS layer has already checked the certificate against the CA; this decides
on the names in it. The peer certificates are the ``getpeercert()`` mappings
Python's ssl module builds, decoded from real certificates.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from natsmesh_operator.webhook.certgen import make_ca_and_cert, make_client_certs
from natsmesh_operator.webhook.server import ClientIdentity

pytestmark = pytest.mark.unit

API_SERVER = "kube-apiserver-webhook-client"


def decoded(certfile: Path) -> dict[str, Any]:
    """The mapping ``SSLSocket.getpeercert()`` returns for this certificate."""
    # The helper ssl's own tests use to decode a certificate the way a
    # handshake does; not public, hence the getattr.
    decode = ssl._ssl._test_decode_cert  # type: ignore[attr-defined]
    cert: dict[str, Any] = decode(str(certfile))
    return cert


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("certs")
    apiserver, other = make_client_certs(tmp / "client", [API_SERVER, "system:node:kwok-node-0"])
    # A serving certificate: its name is a DNS SAN (and the CN).
    serving = make_ca_and_cert(tmp / "serving", ["webhook.example.svc", "10.0.0.1"])
    return {
        "apiserver": decoded(apiserver.certfile),
        "other": decoded(other.certfile),
        "serving": decoded(serving.certfile),
    }


def test_no_certificate_is_never_allowed() -> None:
    anyone = ClientIdentity(Path("ca.crt"))
    assert not anyone.allows(None)
    assert not anyone.allows({})


def test_without_names_any_certificate_of_the_ca_is_allowed(
    certs: dict[str, dict[str, Any]],
) -> None:
    anyone = ClientIdentity(Path("ca.crt"))
    assert all(anyone.allows(c) for c in certs.values())


def test_the_common_name_must_be_one_of_the_names(certs: dict[str, dict[str, Any]]) -> None:
    only = ClientIdentity(Path("ca.crt"), [API_SERVER])
    assert only.allows(certs["apiserver"])
    assert not only.allows(certs["other"])
    assert not ClientIdentity(Path("ca.crt"), ["kube-apiserver"]).allows(certs["apiserver"])


def test_a_dns_san_counts_an_ip_san_and_the_issuer_do_not(
    certs: dict[str, dict[str, Any]],
) -> None:
    serving = certs["serving"]
    assert ClientIdentity(Path("ca.crt"), ["webhook.example.svc"]).allows(serving)
    # The IP is in the certificate, but only as an IP SAN.
    assert ("IP Address", "10.0.0.1") in serving["subjectAltName"]
    assert not ClientIdentity(Path("ca.crt"), ["10.0.0.1"]).allows(serving)
    # The issuing CA's name is in the certificate too, but it is not the client.
    issuer = dict(rdn[0] for rdn in certs["apiserver"]["issuer"])["commonName"]
    assert not ClientIdentity(Path("ca.crt"), [issuer]).allows(certs["apiserver"])
    # Another attribute carrying the name is not the common name.
    forged = {"subject": ((("organizationName", API_SERVER),),)}
    assert not ClientIdentity(Path("ca.crt"), [API_SERVER]).allows(forged)
