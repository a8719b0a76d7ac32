"""Webhook configurations, their Service, and both TLS modes."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from .render import FULLNAME, NAMESPACE, Manifest, render
from .values_sets import VALUE_SETS

pytestmark = pytest.mark.unit

SERVICE = f"{FULLNAME}-webhook"


def _hook(manifest: Manifest, kind: str) -> dict[str, Any]:
    config = manifest.get(kind, FULLNAME)
    assert len(config["webhooks"]) == 1
    webhook: dict[str, Any] = config["webhooks"][0]
    return webhook


def test_mutating_webhook() -> None:
    hook = _hook(render(), "MutatingWebhookConfiguration")
    assert hook["name"] == "inject.natsmesh.io"
    assert hook["clientConfig"]["service"] == {
        "name": SERVICE,
        "namespace": NAMESPACE,
        "path": "/inject",
        "port": 443,
    }
    assert hook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert hook["namespaceSelector"] == {
        "matchLabels": {"natsmesh.io/inject": "enabled"},
        "matchExpressions": [
            {
                "key": "kubernetes.io/metadata.name",
                "operator": "NotIn",
                "values": [NAMESPACE, "kube-system"],
            }
        ],
    }
    assert "objectSelector" not in hook
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["reinvocationPolicy"] == "Never"
    assert hook["failurePolicy"] == "Fail"
    assert hook["timeoutSeconds"] == 5


def test_validating_webhook() -> None:
    hook = _hook(render(), "ValidatingWebhookConfiguration")
    assert hook["name"] == "validate.natsmesh.io"
    assert hook["clientConfig"]["service"]["path"] == "/validate"
    assert hook["clientConfig"]["service"]["name"] == SERVICE
    assert hook["rules"] == [
        {
            "apiGroups": ["natsmesh.io"],
            "apiVersions": ["v1alpha1"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["natsservices", "natsroutes"],
            "scope": "Namespaced",
        }
    ]
    assert hook["sideEffects"] == "None"


@pytest.mark.parametrize("kind", ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"])
def test_failure_policy_and_timeout_from_values(kind: str) -> None:
    hook = _hook(render(VALUE_SETS["webhook-ignore"]), kind)
    assert hook["failurePolicy"] == "Ignore"
    assert hook["timeoutSeconds"] == 10


def test_webhook_service_targets_the_operator() -> None:
    manifest = render()
    service = manifest.get("Service", SERVICE)
    assert service["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": "webhook", "protocol": "TCP"}
    ]
    pod_labels = manifest.get("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port = render({"webhook": {"port": 10443}})
    container = port.get("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "webhook", "containerPort": 10443, "protocol": "TCP"} in container["ports"]


def test_generated_tls_is_consistent() -> None:
    x509 = pytest.importorskip("cryptography.x509")
    manifest = render()
    secret = manifest.get("Secret", f"{FULLNAME}-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    ca_pem = base64.b64decode(secret["data"]["ca.crt"])
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        assert _hook(manifest, kind)["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    ca = x509.load_pem_x509_certificate(ca_pem)
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{SERVICE}.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)
    assert not manifest.has("Certificate")
    assert not manifest.has("Issuer")
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        assert "annotations" not in manifest.get(kind)["metadata"]


def test_cert_manager_mode() -> None:
    manifest = render(VALUE_SETS["cert-manager"])
    # cert-manager makes every TLS Secret (the NATS route credentials Secret is not TLS).
    assert not [s for s in manifest.all("Secret") if s["type"] == "kubernetes.io/tls"]
    issuer = manifest.get("Issuer", f"{FULLNAME}-selfsigned")
    assert issuer["spec"] == {"selfSigned": {}}
    certificate = manifest.get("Certificate", f"{FULLNAME}-webhook")
    assert certificate["spec"]["secretName"] == f"{FULLNAME}-webhook-tls"
    assert certificate["spec"]["issuerRef"]["name"] == f"{FULLNAME}-selfsigned"
    assert f"{SERVICE}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        config = manifest.get(kind)
        assert config["metadata"]["annotations"] == {
            "cert-manager.io/inject-ca-from": f"{NAMESPACE}/{FULLNAME}-webhook"
        }
        assert "caBundle" not in config["webhooks"][0]["clientConfig"]


def test_cert_manager_with_an_existing_issuer() -> None:
    manifest = render(VALUE_SETS["cert-manager-cluster-issuer"])
    assert not manifest.has("Issuer")
    ref = manifest.get("Certificate", f"{FULLNAME}-webhook")["spec"]["issuerRef"]
    assert ref == {"group": "cert-manager.io", "name": "ca", "kind": "ClusterIssuer"}
