"""webhook.clientAuth: the webhook accepts only the API server's client certificate.

Off by default (the API server must be configured to present one). On, the
operator gets the CA (and nothing else of the Secret) and the accepted names,
and reads them as the settings the webhook server enforces; the chart can
generate the CA and the client certificate the admin gives the API server.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from natsmesh_operator.settings import OperatorSettings

from .render import (
    FULLNAME,
    NAMESPACE,
    Manifest,
    env,
    operator_container,
    render,
    render_error,
    render_notes,
)
from .values_sets import VALUE_SETS

pytestmark = pytest.mark.unit

GENERATED = f"{FULLNAME}-webhook-client"
HOST = f"{FULLNAME}-webhook.{NAMESPACE}.svc"


def _client_volume(manifest: Manifest) -> dict[str, Any] | None:
    spec = manifest.get("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in operator_container(manifest)["volumeMounts"]}
    assert ("webhook-client" in volumes) == ("webhook-client" in mounts)
    if "webhook-client" not in volumes:
        return None
    assert mounts["webhook-client"] == {
        "name": "webhook-client",
        "mountPath": "/webhook-client",
        "readOnly": True,
    }
    volume: dict[str, Any] = volumes["webhook-client"]["secret"]
    return volume


def _settings(manifest: Manifest) -> OperatorSettings:
    """What the operator makes of the rendered env (plain values only)."""
    values = env(operator_container(manifest))
    return OperatorSettings.from_env({k: v for k, v in values.items() if isinstance(v, str)})


def test_off_by_default_and_the_notes_say_how_to_turn_it_on() -> None:
    manifest = render()
    assert _client_volume(manifest) is None
    assert not [s for s in manifest.all("Secret") if s["metadata"]["name"] == GENERATED]
    settings = _settings(manifest)
    assert settings.webhook.client_ca_file is None
    assert settings.webhook.client_names == ()
    assert "webhook.clientAuth" in render_notes()


def test_generated_ca_and_client_certificate() -> None:
    manifest = render(VALUE_SETS["webhook-client-generated"])
    secret = manifest.get("Secret", GENERATED)
    # Kept on uninstall: the API server holds a copy of the certificate.
    assert secret["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    assert names == ["kube-apiserver-webhook-client"]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usages
    # Not the serving CA: a webhook serving certificate is no client identity.
    serving = manifest.get("Secret", f"{FULLNAME}-webhook-tls")
    assert serving["data"]["ca.crt"] != secret["data"]["ca.crt"]

    # The operator mounts the CA only, never the API server's key.
    assert _client_volume(manifest) == {
        "secretName": GENERATED,
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
        "defaultMode": 0o440,
    }
    settings = _settings(manifest)
    assert str(settings.webhook.client_ca_file) == "/webhook-client/ca.crt"
    assert settings.webhook.client_names == ("kube-apiserver-webhook-client",)


def test_generated_common_name_is_the_accepted_one() -> None:
    manifest = render({"webhook": {"clientAuth": {"enabled": True, "generatedCommonName": "apis"}}})
    cert = x509.load_pem_x509_certificate(
        base64.b64decode(manifest.get("Secret", GENERATED)["data"]["tls.crt"])
    )
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "apis"
    assert _settings(manifest).webhook.client_names == ("apis",)


def test_an_existing_ca_secret_and_allowed_names() -> None:
    manifest = render(VALUE_SETS["webhook-client-secret"])
    assert not [s for s in manifest.all("Secret") if s["metadata"]["name"] == GENERATED]
    assert _client_volume(manifest) == {
        "secretName": "apiserver-client-ca",
        "items": [{"key": "front-proxy-ca.crt", "path": "ca.crt"}],
        "defaultMode": 0o440,
    }
    settings = _settings(manifest)
    assert str(settings.webhook.client_ca_file) == "/webhook-client/ca.crt"
    assert settings.webhook.client_names == ("kube-apiserver", "kube-apiserver-webhook-client")
    assert "WARNING" not in render_notes(VALUE_SETS["webhook-client-secret"])


def test_an_existing_ca_without_names_is_accepted_with_a_warning() -> None:
    values = {"webhook": {"clientAuth": {"enabled": True, "caSecret": {"name": "cluster-ca"}}}}
    assert _settings(render(values)).webhook.client_names == ()
    notes = render_notes(values)
    assert "allowedNames is empty, so ANY certificate that CA signed" in notes


@pytest.mark.parametrize("values", ["webhook-client-generated", "webhook-client-secret"])
def test_notes_show_the_api_server_side(values: str) -> None:
    notes = render_notes(VALUE_SETS[values])
    for text in (
        "--admission-control-config-file",
        "kind: AdmissionConfiguration",
        "name: MutatingAdmissionWebhook",
        "name: ValidatingAdmissionWebhook",
        "kind: WebhookAdmissionConfiguration",
        # The user the API server picks for a Service webhook on port 443.
        f"- name: {HOST}\n",
        "client-certificate:",
        "client-key:",
    ):
        assert text in notes, text
    generated = f"get secret {GENERATED} -o jsonpath='{{.data.tls\\.key}}'"
    assert (generated in notes) == (values == "webhook-client-generated")


@pytest.mark.parametrize(
    ("client_auth", "path"),
    [
        ({"enabld": True}, "/webhook/clientAuth"),
        ({"allowedNames": ["a,b"]}, "/webhook/clientAuth/allowedNames/0"),
        ({"allowedNames": ["kube apiserver"]}, "/webhook/clientAuth/allowedNames/0"),
        ({"allowedNames": "kube-apiserver"}, "/webhook/clientAuth/allowedNames"),
        ({"caSecret": {"name": "Not_A_Name"}}, "/webhook/clientAuth/caSecret/name"),
        ({"caSecret": {"key": "a/b"}}, "/webhook/clientAuth/caSecret/key"),
        ({"generatedCommonName": ""}, "/webhook/clientAuth/generatedCommonName"),
    ],
    ids=["typo", "comma", "space", "not-a-list", "secret-name", "secret-key", "empty-cn"],
)
def test_schema_refuses_bad_client_auth_values(client_auth: dict[str, Any], path: str) -> None:
    message = render_error({"webhook": {"clientAuth": client_auth}})
    assert path in message, message
