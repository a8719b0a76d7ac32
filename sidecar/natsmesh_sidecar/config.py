"""The sidecar's configuration: the one wire contract between operator and sidecar.

Two parts:

* :class:`SidecarSettings` -- static, from the environment the webhook injects
  (identity, NATS URL, creds path, ports). Changing it means a new pod.
* :class:`MeshTable` -- dynamic, compiled by the operator from NatsService and
  NatsRoute resources and stored as JSON in the route KV bucket under the
  sidecar's own service key. The sidecar watches that key and swaps the table
  in without a restart (the xDS of this mesh). A file can stand in for the KV
  entry (``NATSMESH_TABLE_FILE``) for tests and local runs.

All durations are integer milliseconds on the wire: no parsing on the hot path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from natsmesh_sidecar import readiness, subjects


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --------------------------------------------------------------------------
# Dynamic: the compiled table
# --------------------------------------------------------------------------


class Match(_Wire):
    """Which requests a rule applies to; every given part must match."""

    path_prefix: str = Field("/", alias="pathPrefix")
    methods: tuple[str, ...] = ()
    """Upper-case HTTP methods; empty means any."""
    headers: Mapping[str, str] = Field(default_factory=dict)
    """Exact header values; names are lower-case."""


class WeightedDestination(_Wire):
    version: str = subjects.DEFAULT_VERSION
    weight: int = Field(100, ge=0, le=100)
    subject: str
    """Request subject of that version subset, precomputed by the operator."""


class Retries(_Wire):
    attempts: int = Field(0, ge=0, le=10)
    """Extra attempts after the first one."""
    per_try_timeout_ms: int = Field(0, ge=0, alias="perTryTimeoutMs")
    """0 means the rule's whole timeout applies to each try."""
    retry_on: tuple[str, ...] = Field(("noResponders", "timeout"), alias="retryOn")
    """``noResponders``, ``timeout``, ``5xx`` or a literal status such as ``503``."""
    backoff_base_ms: int = Field(25, ge=0, alias="backoffBaseMs")
    backoff_max_ms: int = Field(250, ge=0, alias="backoffMaxMs")
    retry_non_idempotent: bool = Field(False, alias="retryNonIdempotent")
    """Retry POST/PATCH too; off by default because the app may have acted."""
    # Written only when set, as Rule.max_body_bytes: older sidecars refuse the key.
    grpc_retry_on: tuple[Annotated[int, Field(ge=1, le=16)], ...] = Field(
        (), alias="grpcRetryOn", exclude_if=lambda v: not v
    )
    """gRPC statuses (numbers) that retry a gRPC call whose request the caller's
    sidecar still holds whole (natsmesh_sidecar.calls.outbound); empty: none."""


class FaultDelay(_Wire):
    delay_ms: int = Field(ge=0, alias="delayMs")
    percent: float = Field(ge=0, le=100)


class FaultAbort(_Wire):
    status: int = Field(ge=200, le=599)
    percent: float = Field(ge=0, le=100)


class Fault(_Wire):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


class CircuitBreaker(_Wire):
    consecutive_failures: int = Field(5, ge=1, alias="consecutiveFailures")
    open_ms: int = Field(10_000, ge=1, alias="openMs")
    half_open_probes: int = Field(1, ge=1, alias="halfOpenProbes")


class StreamPolicy(_Wire):
    """A rule's streamed-call settings; 0 means the sidecar's own."""

    idle_timeout_ms: int = Field(0, ge=0, alias="idleTimeoutMs")
    window: int = Field(0, ge=0, le=256)


class Rule(_Wire):
    name: str = "default"
    match: Match = Field(default_factory=lambda: Match())
    destinations: tuple[WeightedDestination, ...]
    timeout_ms: int = Field(15_000, ge=1, alias="timeoutMs")
    retries: Retries = Field(default_factory=lambda: Retries())
    fault: Fault | None = None
    circuit_breaker: CircuitBreaker | None = Field(None, alias="circuitBreaker")
    # Written only when set: a table of rules that don't use them keeps the
    # shape older sidecars accept (their Rule forbids unknown keys), so a new
    # operator serves them until they are upgraded too.
    max_body_bytes: int = Field(0, ge=0, alias="maxBodyBytes", exclude_if=lambda v: not v)
    """0: no limit of the rule's own."""
    stream: StreamPolicy | None = Field(None, exclude_if=lambda v: v is None)


class Destination(_Wire):
    """Traffic policy for calls from this sidecar to one service."""

    namespace: str
    service: str
    rules: tuple[Rule, ...]
    """Ordered; the first whose match fits is used. The last is a catch-all."""


class _Stored(_Wire):
    """A value the operator stores in the route bucket, with a content hash."""

    def with_generation(self) -> Self:
        # Serialized by pydantic-core (fast); field and key order are fixed
        # because the operator builds every mapping in sorted order.
        body = self.model_dump_json(by_alias=True, exclude={"generation"})
        digest = hashlib.sha256(body.encode()).hexdigest()[:16]
        return self.model_copy(update={"generation": digest})

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


class Target(_Stored):
    """One service as the callers of its namespace see it: KV key ``to.<service>``.

    One value per service, not one per (caller, target) pair: a namespace of
    2,000 services keeps 2,000 of these, and a caller's own table stays small.
    A sidecar reads the ones it calls, when it first calls them.
    """

    namespace: str
    service: str
    generation: str = ""
    admits_namespace: bool = Field(True, alias="admitsNamespace")
    """Every service of ``namespace`` may call it."""
    callers: tuple[str, ...] = ()
    """Further admitted callers of ``namespace``, by service name."""
    rules: tuple[Rule, ...]


class Delivery(_Wire):
    """One event subscription, bound to a durable consumer the operator made."""

    stream: str
    consumer: str
    topic: str
    source: str
    """``service.namespace`` of the publisher."""
    path: str
    """HTTP path on the app the event is POSTed to."""
    mode: Literal["atMostOnce", "atLeastOnce", "exactlyOnce"] = "atLeastOnce"
    max_deliver: int = Field(5, ge=1, alias="maxDeliver")
    ack_wait_ms: int = Field(30_000, ge=1, alias="ackWaitMs")
    backoff_ms: tuple[int, ...] = Field((), alias="backoffMs")
    dead_letter_subject: str = Field(alias="deadLetterSubject")
    """After the last allowed delivery fails, publish the message here
    (JetStream publish, original headers kept) and then ``term`` it."""
    api_prefix: str = Field(subjects.JS_API_PREFIX, alias="apiPrefix")
    """JetStream API prefix to bind the consumer with: ``$JS.API`` for a
    publisher in the same namespace, the imported prefix otherwise."""


class Publication(_Wire):
    topic: str
    subject: str
    stream: str


class MeshTable(_Stored):
    """Everything dynamic one sidecar needs; one KV value per service."""

    namespace: str
    service: str
    generation: str = ""
    """Content hash; the sidecar reports which table it runs."""
    known: tuple[str, ...] = ()
    """``service.namespace`` of other namespaces' services this sidecar may
    learn exist (a 403 rather than a 404). Its own namespace's services are
    :class:`Target` keys of their own."""
    destinations: Mapping[str, Destination] = Field(default_factory=dict)
    """Keyed by ``service.namespace``: other namespaces' services this sidecar
    may call (explicit grants: few). A static table (file, tests) may list its
    own namespace's too; they take precedence over Target keys."""
    publishes: Mapping[str, Publication] = Field(default_factory=dict)
    """Keyed by topic."""
    subscriptions: tuple[Delivery, ...] = ()

    @classmethod
    def from_json(cls, raw: bytes | str) -> MeshTable:
        return cls.model_validate_json(raw)


# --------------------------------------------------------------------------
# Static: the environment the webhook injects
# --------------------------------------------------------------------------


class SidecarSettings(_Wire):
    """Read once at start from ``NATSMESH_*`` environment variables."""

    service: str
    namespace: str
    version: str = subjects.DEFAULT_VERSION
    nats_url: str = "nats://127.0.0.1:4222"
    creds_file: str | None = None
    """NATS user creds (JWT + seed); reloaded when the file changes."""
    app_port: int = Field(8080, ge=1, le=65535)
    app_host: str = "127.0.0.1"
    app_protocol: str = Field("http", pattern="^(http|grpc)$")
    """How this sidecar calls its app: ``http`` (HTTP/1.1) or ``grpc`` (HTTP/2
    cleartext with prior knowledge, natsmesh_sidecar.edge.h2app): the
    NatsService's ``protocol``."""
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(15001, ge=0, le=65535)
    # All interfaces: probes and metric scrapes come from outside the pod.
    admin_host: str = "0.0.0.0"
    admin_port: int = Field(15020, ge=0, le=65535)
    table_file: str | None = None
    """Static :class:`MeshTable` JSON instead of the KV watch."""
    max_inflight: int = Field(256, ge=1)
    """Concurrent calls into the app."""
    drain_seconds: float = Field(20.0, ge=0)
    prestop_token: str = Field("", repr=False)
    """What the app container's preStop hook sends in ``Nm-Prestop-Token`` to
    ``GET /prestop`` on the admin port (the webhook writes a random one per
    pod into both). Empty: ``/prestop`` answers 404."""
    prestop_wait_seconds: float = Field(10.0, gt=0)
    """The longest ``/prestop`` waits for the calls the app holds (and never
    longer than ``drain_seconds``); the webhook sets half the pod's grace
    period, so the app keeps the other half for its own shutdown."""
    prestop_hold_seconds: float = Field(60.0, gt=0)
    """After ``/prestop`` the sidecar stays out of its queue group this long
    waiting for its own SIGTERM, then joins again: a pod that was not
    stopping after all (or a leaked token) is out of service for a bounded
    time. The webhook sets the pod's grace period plus a margin."""
    idle_timeout_seconds: float = Field(120.0, gt=0)
    """An app's keep-alive connection to the outbound listener idle this long is
    closed silently (never answered): longer than common client pools keep theirs."""
    app_idle_timeout_seconds: float = Field(4.0, gt=0)
    """Our pooled connections to the app are dropped after this much idleness,
    before the app's own keep-alive timeout (often 5 s) closes them under us."""
    inbound_timeout_seconds: float = Field(30.0, gt=0)
    """The longest a caller may make this sidecar wait on its app: a caller's
    ``Nm-Timeout-Ms`` is clamped to it (and used when a caller sends none)."""
    inbound_max_bytes: int = Field(8 * 1024 * 1024, ge=1)
    """Request bytes held at once, waiting for an app slot or in a call to
    the app; a request past it is answered 503 at once. Bounds memory under
    any caller: message counts alone let 1 MB bodies pile up."""
    ready_check: str = Field("tcp", pattern=readiness.CHECK_PATTERN)
    """When the app can take mesh traffic (the sidecar joins its queue group
    only then): ``tcp`` (a connection to the port is accepted), an HTTP path
    such as ``/healthz`` (``GET`` answers 200-399, as a Kubernetes httpGet
    probe), or ``none`` (join at once: a pod that serves nothing)."""
    ready_port: int = Field(0, ge=0, le=65535)
    """Port of the check on ``app_host``; 0 means ``app_port``."""
    ready_period_seconds: float = Field(1.0, gt=0)
    """Between checks while the app is ready (a failing or starting app is
    checked five times as often, so it is left or joined quickly)."""
    ready_timeout_seconds: float = Field(1.0, gt=0)
    """A check taking longer fails."""
    ready_failure_threshold: int = Field(3, ge=1)
    """Failed checks in a row that make the sidecar leave the queue group; one
    success joins (again)."""
    event_dedup: bool = True
    """``exactlyOnce`` subscriptions skip an event whose Idempotency-Key the
    namespace's completed-key record already holds (see
    natsmesh_sidecar.events.completed); off only to measure what it removes."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP collector base URL (``http://jaeger-collector.tracing:4318``):
    each hop's span is POSTed, in batches, to ``<endpoint>/v1/traces``
    (natsmesh_sidecar.observe.tracing). Unset or empty: no tracing code is loaded."""
    trace_sample_ratio: float = Field(1.0, ge=0, le=1)
    """Share of the traces that start at this sidecar (no valid incoming
    ``traceparent``) that are sampled; a traceparent's sampled flag decides
    for every hop under it."""
    stream_idle_timeout_seconds: float = Field(60.0, gt=0)
    """A streamed body (natsmesh_sidecar.transport.stream) is cut when nothing was heard
    from the other sidecar for this long; both sidecars send a beat every
    quarter of it, so an idle Server-Sent Events stream lives on. Once a
    response streams, this replaces the route's request timeout."""
    stream_chunk_bytes: int = Field(128 * 1024, ge=1024, le=512 * 1024)
    """Size of a streamed body's chunks (one NATS message each)."""
    stream_window: int = Field(8, ge=1, le=256)
    """Chunks in flight per direction of a stream before the receiver's credit."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SidecarSettings:
        env = os.environ if env is None else env
        fields: dict[str, str] = {}
        for name in cls.model_fields:
            key = f"NATSMESH_{name.upper()}"
            if key in env:
                fields[name] = env[key]
        return cls.model_validate(fields)
