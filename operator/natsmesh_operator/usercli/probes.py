"""``natsmesh check``'s probes of the API server: each returns its verdicts.

Raw JSON (``httpx2`` through the user's kubeconfig) where the comparison is
with generated JSON (CRDs), lightkube objects elsewhere. A probe never
raises for what it finds: an unreadable object is a verdict too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import httpx2
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.authorization_v1 import ResourceAttributes, SelfSubjectAccessReviewSpec
from lightkube.resources.authorization_v1 import SelfSubjectAccessReview
from lightkube.resources.core_v1 import Secret

from natsmesh_operator.api import RESOURCES, NatsService
from natsmesh_operator.crdgen.crd import crd
from natsmesh_operator.handlers import kube
from natsmesh_operator.usercli.checks import (
    MIN_KUBERNETES,
    CheckResult,
    crd_differences,
    deployment_result,
    server_version,
)
from natsmesh_operator.usercli.kubeaccess import Access
from natsmesh_operator.usercli.release import OPERATOR_LABELS, Release
from natsmesh_operator.watched import Watched
from natsmesh_operator.wiring.bootstrap import Bootstrap, BootstrapError
from natsmesh_operator.wiring.keys import NKeyError

log = logging.getLogger(__name__)

CRD_FIX = (
    "helm upgrade the release (crds.enabled=true), or: natsmesh crds --stdout | "
    "kubectl apply --server-side --force-conflicts -f -"
)
INSTALL_RESOURCES = (
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"),
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations"),
    ("rbac.authorization.k8s.io", "clusterroles"),
    ("rbac.authorization.k8s.io", "clusterrolebindings"),
)
"""Cluster-scoped kinds ``helm install`` creates: what a pre-install check asks for."""


def _api_error(exc: ApiError) -> str:
    return f"{exc.status.code} {exc.status.reason}: {exc.status.message}"


async def api_server(access: Access) -> CheckResult:
    name = "kubernetes api"
    try:
        async with access.http() as http:
            resp = await http.get("/version")
            resp.raise_for_status()
            info: dict[str, Any] = resp.json()
    except (httpx2.HTTPError, ValueError, OSError) as exc:
        return CheckResult(
            name,
            "FAIL",
            f"{access.server} unreachable ({type(exc).__name__}: {exc})",
            f"check the kubeconfig ({access.source}) and context: kubectl cluster-info",
        )
    version = server_version(info)
    git = info.get("gitVersion", "?")
    need = ".".join(map(str, MIN_KUBERNETES))
    if version is None:
        return CheckResult(name, "WARN", f"{access.server} {git}: version not understood")
    if version < MIN_KUBERNETES:
        return CheckResult(
            name,
            "FAIL",
            f"{access.server} {git}: older than {need}",
            f"upgrade the cluster to Kubernetes {need} or later (the CRDs use selectableFields)",
        )
    return CheckResult(name, "PASS", f"{access.server} {git} (>= {need})")


async def install_permissions(client: AsyncClient, namespace: str) -> CheckResult:
    """Whether the user may create what ``helm install`` creates."""
    wanted = [(g, r, None) for g, r in INSTALL_RESOURCES] + [("", "secrets", namespace)]
    denied = []
    for group, resource, ns in wanted:
        review = SelfSubjectAccessReview(
            spec=SelfSubjectAccessReviewSpec(
                resourceAttributes=ResourceAttributes(
                    verb="create", group=group, resource=resource, namespace=ns
                )
            )
        )
        try:
            answer = await client.create(review)
        except ApiError as exc:
            return CheckResult("permissions", "FAIL", f"access review refused: {_api_error(exc)}")
        if answer.status is None or not answer.status.allowed:
            denied.append(f"{resource}.{group}" if group else f"{resource} in {namespace}")
    if denied:
        return CheckResult(
            "permissions",
            "FAIL",
            f"may not create {', '.join(denied)}",
            "install as a cluster admin (the chart creates cluster-scoped objects)",
        )
    return CheckResult(
        "permissions", "PASS", "may create CRDs, webhook configurations, cluster RBAC, Secrets"
    )


async def crds(access: Access, *, pre: bool) -> list[CheckResult]:
    out = []
    async with access.http() as http:
        for resource in RESOURCES:
            name = f"crd {resource.crd_name()}"
            path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{resource.crd_name()}"
            try:
                resp = await http.get(path)
            except httpx2.HTTPError as exc:
                out.append(CheckResult(name, "FAIL", f"cannot read: {exc}"))
                continue
            if resp.status_code == 404:
                if pre:
                    out.append(
                        CheckResult(name, "PASS", "not installed yet: the chart installs it")
                    )
                else:
                    out.append(CheckResult(name, "FAIL", "not installed", CRD_FIX))
                continue
            if resp.status_code != 200:
                out.append(CheckResult(name, "FAIL", f"cannot read: HTTP {resp.status_code}"))
                continue
            problems = crd_differences(resp.json(), crd(resource))
            if not problems:
                out.append(CheckResult(name, "PASS", "installed, same as this natsmesh generates"))
            elif pre:
                out.append(
                    CheckResult(
                        name,
                        "WARN",
                        f"installed, differs from this version's ({'; '.join(problems)}): "
                        "the chart replaces it",
                    )
                )
            else:
                out.append(
                    CheckResult(
                        name,
                        "FAIL",
                        f"stale: {'; '.join(problems)}",
                        CRD_FIX,
                    )
                )
    return out


def operator_deployments(release: Release) -> list[CheckResult]:
    if not release.deployments:
        labels = ",".join(f"{k}={v}" for k, v in OPERATOR_LABELS.items())
        return [
            CheckResult(
                "operator",
                "FAIL",
                f"no Deployment labelled {labels} in {release.namespace}",
                "install the chart (helm install natsmesh charts/natsmesh -n "
                f"{release.namespace}), or give the release's namespace with --namespace",
            )
        ]
    out = []
    for d in release.deployments:
        name = str(d.metadata.name if d.metadata else "?")
        desired = d.spec.replicas if d.spec and d.spec.replicas is not None else 1
        status = d.status
        ready = (status.readyReplicas or 0) if status else 0
        available = (status.availableReplicas or 0) if status else 0
        verdict, text = deployment_result(name, desired, ready, available)
        out.append(
            CheckResult(
                "operator",
                verdict,
                text,
                f"kubectl -n {release.namespace} describe deployment {name}; "
                f"kubectl -n {release.namespace} logs deployment/{name}",
            )
        )
    return out


async def bootstrap(
    client: AsyncClient, namespace: str, secret: str
) -> tuple[list[CheckResult], Bootstrap | None]:
    """The bootstrap Secret: present, readable, complete; and its root key offline."""
    name = "bootstrap"
    make = (
        f"the chart's bootstrap Job creates it (kubectl -n {namespace} get jobs); by hand: "
        f"natsmesh bootstrap --apply --secret {secret} --namespace {namespace}"
    )
    try:
        data = await kube.read_secret(client, secret, namespace)
    except ApiError as exc:
        return [
            CheckResult(
                name,
                "FAIL",
                f"cannot read Secret {namespace}/{secret}: {_api_error(exc)}",
                "run the check as someone who may read Secrets in the release namespace",
            )
        ], None
    if data is None:
        return [CheckResult(name, "FAIL", f"Secret {namespace}/{secret} not found", make)], None
    try:
        boot = Bootstrap.from_files(data)
    except (BootstrapError, NKeyError) as exc:
        return [CheckResult(name, "FAIL", f"Secret {namespace}/{secret}: {exc}", make)], None
    out = [
        CheckResult(
            name,
            "PASS",
            f"Secret {namespace}/{secret}: operator {boot.operator_public[:12]}..., "
            f"signing key {boot.signing_key.public[:12]}...",
        )
    ]
    if boot.legacy:
        out.append(
            CheckResult(
                "bootstrap root key",
                "WARN",
                f"Secret {namespace}/{secret} holds the NATS operator root key",
                f"natsmesh bootstrap rotate-signing-key --secret {secret} --namespace "
                f"{namespace} --root-out FILE, and keep FILE offline",
            )
        )
    else:
        root = f"{secret}-root"
        try:
            await client.get(Secret, root, namespace=namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                log.debug("reading %s: %s", root, exc)
        else:
            out.append(
                CheckResult(
                    "bootstrap root key",
                    "WARN",
                    f"Secret {namespace}/{root} still holds the NATS operator root key",
                    f"copy it somewhere offline, then kubectl -n {namespace} delete secret {root}",
                )
            )
    return out, boot


def _by_namespace(
    services: Sequence[tuple[NatsService, Mapping[str, Any]]],
) -> dict[str, list[NatsService]]:
    by_ns: dict[str, list[NatsService]] = {}
    for svc, _ in services:
        by_ns.setdefault(str(svc.metadata.namespace), []).append(svc)
    return by_ns


async def meshed_namespaces(client: AsyncClient, watched: Watched) -> list[CheckResult]:
    """Each namespace with NatsServices has its NATS account: one of them got credentials."""
    try:
        services = await kube.list_services(client, watched)
    except ApiError as exc:
        return [
            CheckResult(
                "namespaces",
                "SKIP",
                f"cannot list NatsServices: {_api_error(exc)}",
            )
        ]
    if not services:
        return [CheckResult("namespaces", "PASS", "no NatsService yet")]
    out = []
    for ns, items in sorted(_by_namespace(services).items()):
        with_creds = [
            s
            for s in items
            if any(c.type == "CredentialsReady" and c.status == "True" for c in s.status.conditions)
        ]
        name = f"namespace {ns}"
        if with_creds:
            out.append(
                CheckResult(
                    name,
                    "PASS",
                    f"account ready: {len(with_creds)}/{len(items)} NatsServices have credentials",
                )
            )
            continue
        why = next(
            (
                f"{s.metadata.name}: {c.reason}: {c.message}"
                for s in items
                for c in s.status.conditions
                if c.type in ("CredentialsReady", "Ready") and c.status == "False"
            ),
            "the operator has not written a status yet",
        )
        out.append(
            CheckResult(
                name,
                "FAIL",
                f"no account: none of {len(items)} NatsServices has credentials ({why})",
                f"natsmesh analyze -n {ns}; kubectl -n {ns} describe natsservices; "
                "check the operator's logs",
            )
        )
    return out
