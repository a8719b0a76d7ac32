"""``natsmesh check``'s webhook probe: configured, served, and trusted.

The release's webhooks are the ``*.natsmesh.io`` entries of the admission
configurations that point at its namespace (a Service there, or, for an
operator that registers itself with a URL, configurations named
``natsmesh-<namespace>``). For each: a caBundle, a Service with ready
endpoints, and the serving certificate verified with exactly that caBundle
for the name the API server dials, as the API server will: by a TLS
handshake when this machine reaches the server, else (from outside the
cluster) against the certificate in the Secret the operator mounts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx2
from cryptography import x509
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from natsmesh_operator.usercli.checks import CheckResult
from natsmesh_operator.usercli.kubeaccess import Access

log = logging.getLogger(__name__)

ADMISSION = "/apis/admissionregistration.k8s.io/v1"
KINDS = {
    "MutatingWebhookConfiguration": "mutatingwebhookconfigurations",
    "ValidatingWebhookConfiguration": "validatingwebhookconfigurations",
}
EXPECTED = {
    "inject.natsmesh.io": "MutatingWebhookConfiguration",
    "validate.natsmesh.io": "ValidatingWebhookConfiguration",
}
SUFFIX = ".natsmesh.io"
TLS_TIMEOUT = 3.0


@dataclass(frozen=True)
class Webhook:
    kind: str
    config: str
    name: str
    ca_bundle: bytes
    service: tuple[str, str, int] | None
    """``(namespace, name, port)`` of a Service clientConfig."""
    url: str | None

    @property
    def label(self) -> str:
        return f"webhook {self.name}"

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the serving certificate is presented, and the name it must carry."""
        if self.url:
            parts = urlsplit(self.url)
            return (parts.hostname or "", parts.port or 443) if parts.hostname else None
        if self.service:
            ns, name, port = self.service
            return (f"{name}.{ns}.svc", port)
        return None


def release_webhooks(
    configs: Iterable[tuple[str, Mapping[str, Any]]], namespace: str
) -> list[Webhook]:
    """The ``*.natsmesh.io`` webhooks of ``(kind, configuration)`` pairs that belong to
    the release in ``namespace``."""
    out = []
    for kind, cfg in configs:
        cfg_name = str((cfg.get("metadata") or {}).get("name", ""))
        for hook in cfg.get("webhooks") or []:
            name = str(hook.get("name", ""))
            if not name.endswith(SUFFIX):
                continue
            client = hook.get("clientConfig") or {}
            svc = client.get("service")
            if svc:
                if svc.get("namespace") != namespace:
                    continue
                service: tuple[str, str, int] | None = (
                    str(svc["namespace"]),
                    str(svc.get("name")),
                    int(svc.get("port") or 443),
                )
            elif cfg_name == f"natsmesh-{namespace}":
                service = None
            else:
                continue
            try:
                bundle = base64.b64decode(client.get("caBundle") or "", validate=True)
            except ValueError:
                bundle = b""
            out.append(Webhook(kind, cfg_name, name, bundle, service, client.get("url")))
    return out


async def _list_configs(http: httpx2.AsyncClient) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for kind, plural in KINDS.items():
        resp = await http.get(f"{ADMISSION}/{plural}")
        resp.raise_for_status()
        out += [(kind, item) for item in resp.json().get("items") or []]
    return out


async def ready_endpoints(http: httpx2.AsyncClient, namespace: str, service: str) -> int:
    resp = await http.get(
        f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
        params={"labelSelector": f"kubernetes.io/service-name={service}"},
    )
    resp.raise_for_status()
    return sum(
        1
        for slice_ in resp.json().get("items") or []
        for ep in slice_.get("endpoints") or []
        # Unset means ready (discovery.k8s.io/v1 EndpointConditions).
        if (ep.get("conditions") or {}).get("ready") is not False
    )


async def verify_serving_cert(host: str, port: int, ca_bundle: bytes) -> str | None:
    """None if the handshake verified the certificate with ``ca_bundle``; else why not.

    Raises OSError when nothing answers (not reachable from here).
    """
    context = ssl.create_default_context(cadata=ca_bundle.decode(errors="replace"))
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host),
            timeout=TLS_TIMEOUT,
        )
    except ssl.SSLCertVerificationError as exc:
        return str(exc.verify_message or exc)
    except TimeoutError as exc:
        raise OSError(f"no answer from {host}:{port} within {TLS_TIMEOUT:.0f} s") from exc
    writer.close()
    # The server may end TLS abruptly (it wanted a client certificate).
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return None


# Go's checks, not the Web PKI's: the API server (crypto/x509) wants a CA
# marked as one and a SAN naming the host, and no more (no key identifiers,
# which certificates made by hand or by the test bed lack).
_CA_POLICY = ExtensionPolicy.permit_all().require_present(
    x509.BasicConstraints, Criticality.AGNOSTIC, None
)
_SERVER_POLICY = ExtensionPolicy.permit_all().require_present(
    x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
)


def verify_offline(cert_pem: bytes, ca_bundle: bytes, host: str) -> str | None:
    """None if ``cert_pem`` (leaf first, then any intermediates) is valid now for
    ``host`` under the CAs of ``ca_bundle``; else why not."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
        roots = x509.load_pem_x509_certificates(ca_bundle)
    except ValueError as exc:
        return f"not PEM certificates: {exc}"
    verifier = (
        PolicyBuilder()
        .store(Store(roots))
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_SERVER_POLICY)
        .build_server_verifier(x509.DNSName(host))
    )
    try:
        verifier.verify(chain[0], chain[1:])
    except VerificationError as exc:
        # Without the "(encountered processing <Certificate...>)" tail.
        return str(exc).split(" (encountered processing", 1)[0]
    return None


async def _check(
    http: httpx2.AsyncClient, hook: Webhook, serving: tuple[str, bytes] | None
) -> CheckResult:
    fix_ca = (
        "the caBundle must be the CA of the serving certificate: helm upgrade the release "
        "(or let cert-manager's CA injector fill it), then restart the operator pods"
    )
    if not hook.ca_bundle:
        return CheckResult(hook.label, "FAIL", f"{hook.config}: no caBundle", fix_ca)
    parts: list[str] = []
    if hook.service is not None:
        ns, name, _ = hook.service
        svc = await http.get(f"/api/v1/namespaces/{ns}/services/{name}")
        if svc.status_code == 404:
            return CheckResult(
                hook.label,
                "FAIL",
                f"{hook.config}: Service {ns}/{name} not found",
                "helm upgrade the release; a configuration left by an uninstall can be deleted: "
                f"kubectl delete {hook.kind.lower()} {hook.config}",
            )
        svc.raise_for_status()
        ready = await ready_endpoints(http, ns, name)
        if not ready:
            return CheckResult(
                hook.label,
                "FAIL",
                f"Service {ns}/{name} has no ready endpoints: nothing answers admission",
                f"kubectl -n {ns} get pods -l app.kubernetes.io/component=operator "
                "(the operator serves the webhooks)",
            )
        parts.append(f"Service {ns}/{name}: {ready} ready endpoint(s)")
    else:
        parts.append(f"{hook.url}")
    address = hook.address
    if address is None:
        parts.append("no address to check the certificate at")
        return CheckResult(hook.label, "WARN", "; ".join(parts))
    where = "the serving certificate"
    try:
        problem = await verify_serving_cert(*address, hook.ca_bundle)
    except OSError as exc:
        if serving is None or hook.service is None:
            parts.append(
                f"serving certificate not checked: {address[0]}:{address[1]} not reachable ({exc})"
            )
            return CheckResult(hook.label, "PASS", "; ".join(parts))
        secret, pem = serving
        where = f"the serving certificate in Secret {secret}"
        problem = verify_offline(pem, hook.ca_bundle, address[0])
    if problem is not None:
        return CheckResult(
            hook.label,
            "FAIL",
            f"caBundle of {hook.config} does not verify {where}: {problem}",
            fix_ca,
        )
    parts.append(f"caBundle verifies {where}")
    return CheckResult(hook.label, "PASS", "; ".join(parts))


async def serving_certificate(
    http: httpx2.AsyncClient, namespace: str, secret: str | None
) -> tuple[str, bytes] | None:
    """``(namespace/name, tls.crt)`` of the operator's serving Secret, if readable."""
    if secret is None:
        return None
    resp = await http.get(f"/api/v1/namespaces/{namespace}/secrets/{secret}")
    if resp.status_code != 200:
        log.debug("serving Secret %s/%s: HTTP %s", namespace, secret, resp.status_code)
        return None
    raw = (resp.json().get("data") or {}).get("tls.crt")
    try:
        return (f"{namespace}/{secret}", base64.b64decode(raw, validate=True)) if raw else None
    except ValueError:
        return None


async def webhooks(
    access: Access, namespace: str, serving_secret: str | None = None
) -> list[CheckResult]:
    async with access.http() as http:
        try:
            hooks = release_webhooks(await _list_configs(http), namespace)
        except httpx2.HTTPError as exc:
            return [CheckResult("webhooks", "FAIL", f"cannot list webhook configurations: {exc}")]
        out = []
        for name, kind in EXPECTED.items():
            if not any(h.name == name for h in hooks):
                out.append(
                    CheckResult(
                        f"webhook {name}",
                        "FAIL",
                        f"no {kind} with {name} for the release in {namespace}",
                        f"helm upgrade --install the release in {namespace} (or pass its "
                        "namespace with --namespace)",
                    )
                )
        serving = await serving_certificate(http, namespace, serving_secret)
        for hook in hooks:
            try:
                out.append(await _check(http, hook, serving))
            except httpx2.HTTPError as exc:
                out.append(CheckResult(hook.label, "FAIL", f"{hook.config}: {exc}"))
        return out


async def leftovers(access: Access) -> list[CheckResult]:
    """Pre-install: natsmesh webhooks whose Service is gone (left by an uninstall).

    With failurePolicy Fail they refuse every pod in a labelled namespace.
    """
    async with access.http() as http:
        try:
            configs = await _list_configs(http)
        except httpx2.HTTPError as exc:
            return [
                CheckResult("old webhooks", "SKIP", f"cannot list webhook configurations: {exc}")
            ]
        stale = []
        for kind, cfg in configs:
            for hook in cfg.get("webhooks") or []:
                svc = (hook.get("clientConfig") or {}).get("service")
                if not str(hook.get("name", "")).endswith(SUFFIX) or not svc:
                    continue
                resp = await http.get(
                    f"/api/v1/namespaces/{svc.get('namespace')}/services/{svc.get('name')}"
                )
                if resp.status_code == 404:
                    stale.append((kind, str(cfg["metadata"]["name"])))
        if not stale:
            return [
                CheckResult(
                    "old webhooks", "PASS", "no natsmesh webhook points at a missing Service"
                )
            ]
        names = sorted(set(stale))
        return [
            CheckResult(
                "old webhooks",
                "FAIL",
                "left from an earlier install, their Service is gone: "
                + ", ".join(f"{k} {n}" for k, n in names),
                "; ".join(f"kubectl delete {k.lower()} {n}" for k, n in names),
            )
        ]
