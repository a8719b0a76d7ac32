"""The wiring's own, Kubernetes-free description of what the mesh should be.

The operator turns each NatsService into a :class:`ServiceIntent` and each
NatsRoute into a :class:`RouteIntent` (see :mod:`.routes`); :func:`.plan.plan`
turns the whole list into the NATS objects to create. Keeping these types here
(and not the CRD models) means the wiring can be tested and reasoned about
without a cluster and does not change when a CRD grows a cosmetic field.

Durations are integer milliseconds, as on the sidecar's wire.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from natsmesh_sidecar import subjects

log = logging.getLogger(__name__)

DeliveryMode = Literal["atMostOnce", "atLeastOnce", "exactlyOnce"]
Retention = Literal["limits", "interest", "workqueue"]
Storage = Literal["file", "memory"]
DeliverPolicy = Literal["all", "new", "last"]

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class CallerRef:
    """A NatsService *resource* allowed to call; ``namespace`` None means the target's own.

    Not a mesh identity: :mod:`.grants` resolves it to the service that
    resource serves in the current pass, if it holds one.
    """

    resource: str
    namespace: str | None = None

    def where(self, default_namespace: str) -> tuple[str, str]:
        """``(namespace, resource name)`` of the granted resource."""
        return (self.namespace or default_namespace, self.resource)


@dataclass(frozen=True)
class StreamSettings:
    """How a publisher's events are kept (one stream per publishing service)."""

    retention: Retention = "limits"
    max_age_ms: int = 7 * DAY_MS
    replicas: int = 1
    storage: Storage = "file"
    max_bytes: int = -1
    max_msgs: int = -1
    duplicate_window_ms: int = 120_000
    """Window for ``Nats-Msg-Id`` de-duplication (exactly-once publishing)."""


@dataclass(frozen=True)
class Publish:
    topic: str
    stream: StreamSettings = field(default_factory=StreamSettings)


@dataclass(frozen=True)
class Subscribe:
    """One event subscription: ``topic`` published by ``service`` (in ``namespace``)."""

    topic: str
    service: str
    path: str = "/"
    namespace: str | None = None
    delivery: DeliveryMode = "atLeastOnce"
    max_deliver: int = 5
    ack_wait_ms: int = 30_000
    backoff_ms: tuple[int, ...] = ()
    deliver_policy: DeliverPolicy = "new"
    """``new``: a new subscriber does not replay the stream's history."""

    def source(self, default_namespace: str) -> tuple[str, str]:
        return (self.namespace or default_namespace, self.service)


@dataclass(frozen=True)
class ServiceIntent:
    """One NatsService, as far as NATS is concerned.

    Who may call it, as in the CRD: every service of its own namespace when
    ``allow_same_namespace`` (the default), plus the services of the
    NatsService resources ``allowed_callers`` lists (a caller without a
    namespace is in this service's namespace). Nobody from another namespace
    unless listed.
    """

    namespace: str
    name: str
    version: str = subjects.DEFAULT_VERSION
    allowed_callers: tuple[CallerRef, ...] = ()
    allow_same_namespace: bool = True
    publishes: tuple[Publish, ...] = ()
    subscriptions: tuple[Subscribe, ...] = ()
    resource: str = ""
    """Name of the NatsService resource (defaults to ``name``): where problems go."""
    created: str = ""
    """The resource's ``metadata.creationTimestamp`` (RFC 3339, UTC, as the API
    server writes it, so text order is time order). Of two resources claiming
    one subject, the one created first keeps it; empty sorts last."""
    uid: str = ""
    """The resource's ``metadata.uid``: the tiebreak between two created in the
    same second (arbitrary but stable, unlike a name an attacker picks)."""

    @property
    def resource_name(self) -> str:
        return self.resource or self.name

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def claim_order(self) -> tuple[bool, str, str]:
        """Sorts the first claimant first: creation time, then uid."""
        return (not self.created, self.created, self.uid)


@dataclass(frozen=True)
class AccountLimits:
    """Per-namespace account limits; -1 is unlimited (NATS JWT convention).

    JetStream storage defaults to -1 on purpose: nats-server *reserves* an
    account's storage limit when it enables JetStream for it, so a fixed
    10 GiB per namespace left a 54 GB server with JetStream for only five
    namespaces ("insufficient storage resources available", 10047). Each
    stream is bounded by its own maxAge/maxBytes from the NatsService.
    """

    connections: int = -1
    subscriptions: int = -1
    payload: int = -1
    mem_storage: int = -1
    disk_storage: int = -1
    streams: int = -1
    consumers: int = -1
