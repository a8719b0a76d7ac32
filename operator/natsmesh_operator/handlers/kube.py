"""The operator's own Kubernetes calls (lightkube): resources, Secrets, events.

kopf watches and patches the custom resources it handles; everything else the
operator reads or writes goes through here, so the handlers stay readable
and tests can point one client at the local control plane.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta, OwnerReference
from lightkube.resources.core_v1 import Secret
from lightkube.resources.networking_v1 import NetworkPolicy

from natsmesh_operator.api import GROUP, VERSION, NatsRoute, NatsService
from natsmesh_operator.watched import Watched

logger = logging.getLogger(__name__)

NatsServiceRes = create_namespaced_resource(GROUP, VERSION, "NatsService", "natsservices")
NatsRouteRes = create_namespaced_resource(GROUP, VERSION, "NatsRoute", "natsroutes")

LABEL_MANAGED = "app.kubernetes.io/managed-by"
LABEL_CREDS = "natsmesh.io/creds"
LABEL_SERVICE = "natsmesh.io/resource"
ANNOTATION_ISSUED_USER = "natsmesh.io/issued-user"
"""On a creds Secret: the user public key the operator issued into it. Only
a Secret carrying it, owned by a NatsService and holding a JWT that the
namespace's account key signed for that very user, is one the operator made."""


def controlled_by_natsservice(obj: Secret | NetworkPolicy) -> bool:
    """Whether the object's controller owner reference names a NatsService."""
    refs = (obj.metadata.ownerReferences or []) if obj.metadata else []
    return any(
        r.controller and r.kind == "NatsService" and r.apiVersion.startswith(f"{GROUP}/")
        for r in refs
    )


def client_from_env() -> AsyncClient:
    """In-cluster service account, else ``KUBECONFIG``/``~/.kube/config``."""
    return AsyncClient(config=KubeConfig.from_env(), field_manager="natsmesh-operator")


def body_of(obj: Any) -> dict[str, Any]:
    """The object as a plain dict, without ``metadata.managedFields``.

    The operator never reads managedFields, and they were 60% of a
    NatsService's parsed size (11 of 18 KiB): a pass over 1,000 services held
    them twice (the body and the model's metadata), ~20 MB for nothing.
    """
    data: dict[str, Any] = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    meta = data.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        # A new metadata dict: a mapping handed in is not changed under its owner.
        data["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
    return data


LIST_RETRY_SECONDS = 0.25
"""Pause before the one retry of a failed list a webhook depends on."""

LIST_CHUNK = 250
"""Objects per page when a pass lists a kind: one response of 1,000
NatsServices parsed at once was ~17 MB of dicts alive together; a page at a
time, only what the pass keeps (without managedFields) accumulates."""


async def list_watched(
    kube: AsyncClient, res: Any, watched: Watched, **kwargs: Any
) -> AsyncIterator[Any]:
    """``res`` objects in the watched namespaces: listed in each one when they
    are exact names (a namespaced install may not list across the cluster),
    else across the cluster and filtered; in pages of :data:`LIST_CHUNK`."""
    for namespace in watched.exact or ("*",):
        async for obj in kube.list(res, namespace=namespace, chunk_size=LIST_CHUNK, **kwargs):
            meta = getattr(obj, "metadata", None)
            if meta is not None and watched(str(meta.namespace)):
                yield obj


R = TypeVar("R", NatsService, NatsRoute)


def _skip(body: Mapping[str, Any], watched: Watched) -> bool:
    meta = body.get("metadata", {})
    return bool(meta.get("deletionTimestamp")) or not watched(str(meta.get("namespace")))


@dataclass(frozen=True)
class Invalid:
    """A stored resource our models refuse (stored before a rule was tightened,
    or while the schema was not installed): it fails its own status only."""

    kind: str
    body: Mapping[str, Any]
    error: str


async def _list(
    kube: AsyncClient, res: Any, model: type[R], watched: Watched, invalid: list[Invalid]
) -> list[tuple[R, Mapping[str, Any]]]:
    out: list[tuple[R, Mapping[str, Any]]] = []
    async for obj in list_watched(kube, res, watched):
        body = body_of(obj)
        if _skip(body, watched):
            continue
        try:
            out.append((model.from_body(body), body))
        except ValueError as exc:  # pydantic ValidationError too
            meta = body.get("metadata", {})
            logger.warning(
                "%s %s/%s is invalid: %s",
                model.__name__,
                meta.get("namespace"),
                meta.get("name"),
                exc,
            )
            invalid.append(Invalid(model.__name__, body, str(exc)))
    return out


async def list_services(
    kube: AsyncClient, watched: Watched, invalid: list[Invalid] | None = None
) -> list[tuple[NatsService, Mapping[str, Any]]]:
    """Every watched NatsService not being deleted, with its raw body (uid, …).

    One the models refuse goes into ``invalid`` instead of failing the list.
    """
    return await _list(
        kube, NatsServiceRes, NatsService, watched, [] if invalid is None else invalid
    )


async def list_routes(
    kube: AsyncClient, watched: Watched, invalid: list[Invalid] | None = None
) -> list[tuple[NatsRoute, Mapping[str, Any]]]:
    """Every watched NatsRoute not being deleted, with its raw body."""
    return await _list(kube, NatsRouteRes, NatsRoute, watched, [] if invalid is None else invalid)


async def namespace_services(kube: AsyncClient, namespace: str) -> list[NatsService]:
    """The NatsServices of one namespace, not being deleted; invalid ones left out.

    The webhooks ask this and fail closed on an error, so one failed list
    (seen in CI right after the active operator replica was deleted) is
    retried once before it refuses a user's request.
    """
    try:
        bodies = [body_of(obj) async for obj in kube.list(NatsServiceRes, namespace=namespace)]
    except ApiError as exc:
        logger.warning("listing NatsServices in %s: %s; retrying once", namespace, exc)
        await asyncio.sleep(LIST_RETRY_SECONDS)
        bodies = [body_of(obj) async for obj in kube.list(NatsServiceRes, namespace=namespace)]
    invalid: list[Invalid] = []
    out = []
    for body in bodies:
        if body.get("metadata", {}).get("deletionTimestamp"):
            continue
        try:
            out.append(NatsService.from_body(body))
        except ValueError as exc:  # pydantic ValidationError too
            invalid.append(Invalid("NatsService", body, str(exc)))
    if invalid:
        logger.warning("%d invalid NatsService(s) in %s left out", len(invalid), namespace)
    return out


def decode_secret(secret: Secret) -> dict[str, str]:
    """The Secret's entries as text; an entry that is not base64 of UTF-8 is left out.

    Anyone who may create Secrets can put any bytes there: one such entry
    must never raise out of a pass.
    """
    out: dict[str, str] = {}
    for key, value in (secret.data or {}).items():
        try:
            out[key] = base64.b64decode(value, validate=True).decode()
        except (ValueError, TypeError):
            logger.debug("Secret entry %r is not base64 of UTF-8 text; ignored", key)
    return out


async def read_secret(kube: AsyncClient, name: str, namespace: str) -> dict[str, str] | None:
    found = await read_secret_versioned(kube, name, namespace)
    return found[0] if found is not None else None


async def read_secret_versioned(
    kube: AsyncClient, name: str, namespace: str
) -> tuple[dict[str, str], str] | None:
    """The Secret's entries and its ``resourceVersion``, None if there is none."""
    try:
        secret = await kube.get(Secret, name, namespace=namespace)
    except ApiError as exc:
        if exc.status.code == 404:
            return None
        raise
    return decode_secret(secret), str(secret.metadata.resourceVersion if secret.metadata else "")


async def list_creds_secrets(kube: AsyncClient, watched: Watched) -> list[Secret]:
    return [
        s
        async for s in list_watched(kube, Secret, watched, labels={LABEL_CREDS: "true"})
        if s.metadata is not None
    ]


def owner_reference(body: Mapping[str, Any]) -> OwnerReference:
    meta = body["metadata"]
    return OwnerReference(
        apiVersion=str(body.get("apiVersion", f"{GROUP}/{VERSION}")),
        kind=str(body.get("kind", "NatsService")),
        name=meta["name"],
        uid=meta["uid"],
        controller=True,
        blockOwnerDeletion=True,
    )


async def write_secret(
    kube: AsyncClient,
    name: str,
    namespace: str,
    data: Mapping[str, str],
    *,
    labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
    owner: OwnerReference | None = None,
) -> str:
    """Create or replace a Secret (server-side apply: one field manager, no races);
    its new ``resourceVersion``."""
    secret = Secret(
        metadata=ObjectMeta(
            name=name,
            namespace=namespace,
            labels={LABEL_MANAGED: "natsmesh", **labels},
            annotations=dict(annotations) if annotations else None,
            ownerReferences=[owner] if owner else None,
        ),
        type="Opaque",
        data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    )
    written = await kube.apply(secret, force=True)
    return str(written.metadata.resourceVersion if written.metadata else "")


async def delete_secret(kube: AsyncClient, name: str, namespace: str) -> None:
    try:
        await kube.delete(Secret, name, namespace=namespace)
    except ApiError as exc:
        if exc.status.code != 404:
            raise
