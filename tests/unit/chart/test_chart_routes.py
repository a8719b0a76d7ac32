"""NATS cluster routes: generated credentials in a Secret, mutual TLS, and max_control_line."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

from .render import FULLNAME, NAMESPACE, Manifest, env, operator_container, render, render_error
from .values_sets import VALUE_SETS

pytestmark = pytest.mark.unit

NATS = f"{FULLNAME}-nats"
HEADLESS = f"{NATS}-headless"
ROUTES = f"{NATS}-routes"
ROUTES_TLS = f"{NATS}-routes-tls"
POD_NAMES = {
    f"*.{HEADLESS}.{NAMESPACE}.svc",
    f"*.{HEADLESS}.{NAMESPACE}.svc.cluster.local",
    f"*.{HEADLESS}.{NAMESPACE}",
    f"*.{HEADLESS}",
}


def _secret(manifest: Manifest, name: str) -> dict[str, Any] | None:
    found = [s for s in manifest.all("Secret") if s["metadata"]["name"] == name]
    return found[0] if found else None


def _conf(manifest: Manifest) -> str:
    conf: str = manifest.get("ConfigMap", f"{NATS}-config")["data"]["nats.conf"]
    return conf


def _pod(manifest: Manifest) -> dict[str, Any]:
    pod: dict[str, Any] = manifest.get("StatefulSet", NATS)["spec"]["template"]["spec"]
    return pod


def test_route_credentials_are_generated_into_a_secret() -> None:
    manifest = render()
    secret = _secret(manifest, ROUTES)
    assert secret is not None
    assert secret["type"] == "Opaque"
    data = secret["stringData"]
    user, password = data["username"], data["password"]
    assert user == "natsmesh-route"
    # URL- and config-safe, and long enough not to be guessed (48 of [A-Za-z0-9]: 285 bits).
    assert re.fullmatch(r"[A-Za-z0-9]{48}", password)
    routes_conf = data["routes.conf"]
    assert f'user: "{user}"' in routes_conf
    assert f'password: "{password}"' in routes_conf
    urls = re.findall(r'"(nats://[^"]+)"', routes_conf)
    assert urls == [
        f"nats://{user}:{password}@{NATS}-{i}.{HEADLESS}.{NAMESPACE}.svc:6222" for i in range(3)
    ]
    # Nothing else holds the password: not the ConfigMap, not the pod spec.
    for doc in manifest.docs:
        if doc is not secret:
            assert password not in repr(doc), f"{doc['kind']}/{doc['metadata']['name']}"


def test_a_new_install_gets_a_new_password() -> None:
    """`helm template` has no cluster to look up: each render is a first install."""
    first = _secret(render(), ROUTES)
    second = _secret(render({"nats": {"replicas": 3, "maxPayload": "1MB"}}), ROUTES)
    assert first is not None
    assert second is not None
    assert first["stringData"]["password"] != second["stringData"]["password"]


def test_the_cluster_block_includes_the_routes_from_the_secret() -> None:
    manifest = render()
    conf = _conf(manifest)
    cluster = conf[conf.index("cluster {") :]
    assert "include ../routes/routes.conf" in cluster
    assert "nats://" not in conf
    pod = _pod(manifest)
    volumes = {v["name"]: v for v in pod["volumes"]}
    # nats.conf (in /etc/nats/config) includes ../routes/: the mount path must match.
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "routes"]
    assert mount["mountPath"] == "/etc/nats/routes"
    assert mount["readOnly"] is True
    routes = volumes["routes"]["secret"]
    assert routes["secretName"] == ROUTES
    assert routes["items"] == [{"key": "routes.conf", "path": "routes.conf"}]


def test_route_tls_is_on_by_default_with_a_generated_chain() -> None:
    x509 = pytest.importorskip("cryptography.x509")
    manifest = render()
    conf = _conf(manifest)
    tls = conf[conf.index("cluster {") :]
    for line in (
        "cert_file: /etc/nats/routes-tls/tls.crt",
        "key_file: /etc/nats/routes-tls/tls.key",
        "ca_file: /etc/nats/routes-tls/ca.crt",
        "verify: true",
    ):
        assert line in tls
    secret = _secret(manifest, ROUTES_TLS)
    assert secret is not None
    assert secret["type"] == "kubernetes.io/tls"
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == POD_NAMES
    assert not names.get_values_for_type(x509.IPAddress)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    oid = x509.oid.ExtendedKeyUsageOID
    # Every server both accepts and dials routes: one certificate, both usages.
    assert {oid.SERVER_AUTH, oid.CLIENT_AUTH} <= set(usages)
    # Not the webhook's CA: a route certificate must not be able to serve the webhook.
    webhook = _secret(manifest, f"{FULLNAME}-webhook-tls")
    assert webhook is not None
    assert webhook["data"]["ca.crt"] != secret["data"]["ca.crt"]
    pod = _pod(manifest)
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "routes-tls"]
    assert mount["mountPath"] == "/etc/nats/routes-tls"
    volume = next(v for v in pod["volumes"] if v["name"] == "routes-tls")["secret"]
    assert volume["secretName"] == ROUTES_TLS
    assert volume["defaultMode"] == 0o440


def test_route_tls_off() -> None:
    manifest = render(VALUE_SETS["nats-routes-no-tls"])
    assert "tls {" not in _conf(manifest)
    assert _secret(manifest, ROUTES_TLS) is None
    assert _secret(manifest, ROUTES) is not None  # the credentials stay
    assert "routes-tls" not in {v["name"] for v in _pod(manifest)["volumes"]}


def test_route_tls_with_cert_manager_uses_a_ca_issuer() -> None:
    """Renewals must keep the CA every pod trusts, so not the self-signed Issuer directly."""
    manifest = render(VALUE_SETS["cert-manager"])
    assert _secret(manifest, ROUTES_TLS) is None  # cert-manager writes it
    ca = manifest.get("Certificate", f"{NATS}-routes-ca")
    assert ca["spec"]["isCA"] is True
    assert ca["spec"]["issuerRef"]["name"] == f"{FULLNAME}-selfsigned"
    issuer = manifest.get("Issuer", f"{NATS}-routes-ca")
    assert issuer["spec"] == {"ca": {"secretName": f"{NATS}-routes-ca"}}
    cert = manifest.get("Certificate", f"{NATS}-routes")["spec"]
    assert cert["secretName"] == ROUTES_TLS
    assert set(cert["dnsNames"]) == POD_NAMES
    assert {"server auth", "client auth"} <= set(cert["usages"])
    assert cert["issuerRef"] == {
        "group": "cert-manager.io",
        "name": f"{NATS}-routes-ca",
        "kind": "Issuer",
    }
    assert "verify: true" in _conf(manifest)


def test_route_tls_with_an_existing_issuer() -> None:
    manifest = render(VALUE_SETS["cert-manager-cluster-issuer"])
    assert not manifest.has("Issuer")
    names = {c["metadata"]["name"] for c in manifest.all("Certificate")}
    assert names == {f"{FULLNAME}-webhook", f"{NATS}-routes"}
    ref = manifest.get("Certificate", f"{NATS}-routes")["spec"]["issuerRef"]
    assert ref == {"group": "cert-manager.io", "name": "ca", "kind": "ClusterIssuer"}


@pytest.mark.parametrize("name", ["nats-single", "nats-external", "nats-external-secret"])
def test_no_routes_no_route_secrets(name: str) -> None:
    manifest = render(VALUE_SETS[name])
    assert _secret(manifest, ROUTES) is None
    assert _secret(manifest, ROUTES_TLS) is None
    assert not [c for c in manifest.all("Certificate") if "routes" in c["metadata"]["name"]]


# ---------------------------------------------------------------- max_control_line


def test_max_control_line_default_reaches_server_and_operator() -> None:
    manifest = render()
    assert "\nmax_control_line: 16384\n" in _conf(manifest)
    assert env(operator_container(manifest))["NATSMESH_NATS_MAX_CONTROL_LINE"] == "16384"


def test_max_control_line_follows_the_value() -> None:
    manifest = render({"nats": {"maxControlLine": 65536}})
    assert "\nmax_control_line: 65536\n" in _conf(manifest)
    assert env(operator_container(manifest))["NATSMESH_NATS_MAX_CONTROL_LINE"] == "65536"


def test_max_control_line_reaches_the_operator_with_external_nats() -> None:
    """The operator sizes JWTs for an external server too (set the same there)."""
    values = {"nats": {**VALUE_SETS["nats-external"]["nats"], "maxControlLine": 8192}}
    container = operator_container(render(values))
    assert env(container)["NATSMESH_NATS_MAX_CONTROL_LINE"] == "8192"


@pytest.mark.parametrize(
    ("value", "says"),
    [(4095, "minimum"), (2048, "minimum"), ("16k", "want integer"), (16384.5, "integer")],
)
def test_max_control_line_is_validated(value: Any, says: str) -> None:
    message = render_error({"nats": {"maxControlLine": value}})
    assert "/nats/maxControlLine" in message
    assert says in message


def test_max_control_line_accepts_the_nats_default() -> None:
    assert "max_control_line: 4096" in _conf(render({"nats": {"maxControlLine": 4096}}))
