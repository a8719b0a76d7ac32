"""The mesh as the API server holds it: what ``status`` and ``analyze`` look at.

:class:`Snapshot` is plain data (models and pod labels), so the rules and the
tables built from it need no server. :func:`load` fills it: the namespaces
asked for, plus the namespaces their resources point into (callers and
publishers elsewhere), as far as the user may read them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Pod

from natsmesh_operator.api import Condition, NatsRoute, NatsService
from natsmesh_operator.handlers import kube
from natsmesh_operator.watched import EVERYWHERE, Watched

log = logging.getLogger(__name__)

FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class PodLabels:
    """A live pod: its name and labels (all a selector looks at)."""

    namespace: str
    name: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class InvalidResource:
    """A stored resource the models refuse; the operator leaves it out."""

    kind: str
    namespace: str
    name: str
    error: str


@dataclass(frozen=True)
class Snapshot:
    services: tuple[NatsService, ...] = ()
    routes: tuple[NatsRoute, ...] = ()
    invalid: tuple[InvalidResource, ...] = ()
    pods: Mapping[str, tuple[PodLabels, ...]] = field(default_factory=dict)
    """Pods by namespace; a namespace missing here was not listed (not: has none)."""
    selected: frozenset[str] | None = None
    """The namespaces asked about; None: all."""
    unreadable: frozenset[str] = frozenset()
    """Namespaces referenced from the selection that the user may not list."""

    def in_scope(self, namespace: str | None) -> bool:
        return self.selected is None or namespace in self.selected

    def services_in(self, namespace: str) -> list[NatsService]:
        return [s for s in self.services if s.metadata.namespace == namespace]

    @property
    def namespaces(self) -> list[str]:
        """Namespaces in scope that hold a NatsService or NatsRoute, sorted."""
        found = {str(r.metadata.namespace) for r in (*self.services, *self.routes)}
        return sorted(ns for ns in found if self.in_scope(ns))


def condition(resource: NatsService | NatsRoute, type_: str) -> Condition | None:
    for c in resource.status.conditions:
        if c.type == type_:
            return c
    return None


def referenced_namespaces(services: Iterable[NatsService]) -> set[str]:
    """Namespaces that allowedCallers and subscriptions of ``services`` name."""
    out: set[str] = set()
    for svc in services:
        out |= {c.namespace for c in svc.spec.allowed_callers if c.namespace}
        out |= {s.namespace for s in svc.spec.events.subscriptions if s.namespace}
    return out


def _invalid(items: Iterable[kube.Invalid]) -> list[InvalidResource]:
    out = []
    for item in items:
        meta = item.body.get("metadata") or {}
        out.append(
            InvalidResource(
                item.kind, str(meta.get("namespace")), str(meta.get("name")), item.error
            )
        )
    return out


async def _list(
    client: AsyncClient, watched: Watched
) -> tuple[list[NatsService], list[NatsRoute], list[InvalidResource]]:
    invalid: list[kube.Invalid] = []
    services = [s for s, _ in await kube.list_services(client, watched, invalid)]
    routes = [r for r, _ in await kube.list_routes(client, watched, invalid)]
    return services, routes, _invalid(invalid)


async def list_pods(client: AsyncClient, namespace: str) -> tuple[PodLabels, ...]:
    out = []
    async for pod in client.list(Pod, namespace=namespace, chunk_size=kube.LIST_CHUNK):
        meta, status = pod.metadata, pod.status
        if meta is None or meta.deletionTimestamp is not None:
            continue
        if status is not None and status.phase in FINISHED_PHASES:
            continue
        out.append(PodLabels(namespace, str(meta.name), dict(meta.labels or {})))
    return tuple(out)


async def load(client: AsyncClient, namespace: str | None, *, pods: bool = True) -> Snapshot:
    """The resources of ``namespace`` (None: every namespace) and what they reference."""
    selected = None if namespace is None else frozenset({namespace})
    watched = EVERYWHERE if namespace is None else Watched((namespace,))
    services, routes, invalid = await _list(client, watched)
    unreadable: set[str] = set()
    if selected is not None:
        # Callers and publishers in other namespaces: without them a grant
        # or subscription that works would look dangling.
        for other in sorted(referenced_namespaces(services) - selected):
            try:
                more, more_routes, more_invalid = await _list(client, Watched((other,)))
            except ApiError as exc:
                log.debug("cannot list in %s: %s", other, exc)
                unreadable.add(other)
                continue
            services += more
            routes += more_routes
            invalid += more_invalid
    pod_map: dict[str, tuple[PodLabels, ...]] = {}
    if pods:
        in_scope = {str(s.metadata.namespace) for s in services}
        if selected is not None:
            in_scope &= selected
        for ns in sorted(in_scope):
            try:
                pod_map[ns] = await list_pods(client, ns)
            except ApiError as exc:
                log.debug("cannot list pods in %s: %s", ns, exc)
    return Snapshot(
        services=tuple(services),
        routes=tuple(routes),
        invalid=tuple(invalid),
        pods=pod_map,
        selected=selected,
        unreadable=frozenset(unreadable),
    )
