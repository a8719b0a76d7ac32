"""The NatsService custom resource: one workload on the mesh.

A NatsService names the pods that get a sidecar, the HTTP port of the app, its
version subset, who may call it, and which events it publishes and consumes.
The operator turns it into a NATS user with least-privilege permissions, a
JetStream stream for its events and durable consumers for its subscriptions.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Self

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from natsmesh_operator.api.common import (
    CONDITIONS_EXTRA,
    MAX_BACKOFF_STEPS,
    MAX_CALLERS,
    MAX_CONDITIONS,
    MAX_SUBSCRIPTIONS,
    MAX_TOPICS,
    ApiModel,
    Condition,
    Duration,
    DurationRange,
    HttpPath,
    JsonDict,
    Name,
    Topic,
    Version,
    cel,
    parse_duration_ms,
    schema_extra,
)
from natsmesh_operator.api.resource import (
    AGE_COLUMN,
    READY_COLUMN,
    CustomResource,
    printer_column,
)
from natsmesh_operator.api.selector import LabelSelector

#: Ports the sidecar listens on inside the pod (outbound proxy, admin).
SIDECAR_PORTS = (15001, 15020)
DEFAULT_MAX_DELIVER = 5
DEFAULT_ACK_WAIT = "30s"

_PORT_TAKEN = "port must not be 15001 or 15020: the sidecar listens there"
_AT_MOST_ONCE_REDELIVERY = "atMostOnce delivery is never redelivered: maxDeliver must be 1 or unset"
_AT_MOST_ONCE_BACKOFF = "atMostOnce delivery is never redelivered: backoff must be empty"
_AT_MOST_ONCE_ACK_WAIT = "atMostOnce delivery does not wait for an ack: ackWait must be unset"
CALLER_SERVICE_REFUSED = (
    "allowedCallers[].service is no longer accepted: a grant names the calling NatsService "
    "resource, so write name: <its metadata.name> instead (not its spec.service)"
)
CALLER_NAME_REQUIRED = "allowedCallers[].name is required: the calling NatsService's metadata.name"
_BACKOFF_TOO_LONG = (
    "backoff must have fewer steps than maxDeliver (default 5): "
    "step i is the wait before delivery i+2"
)


def _not_sidecar_port(port: int) -> int:
    if port in SIDECAR_PORTS:
        raise ValueError(_PORT_TAKEN)
    return port


Port = Annotated[
    int,
    Field(ge=1, le=65535),
    AfterValidator(_not_sidecar_port),
    Field(json_schema_extra=schema_extra(cel("self != 15001 && self != 15020", _PORT_TAKEN))),
]


def _unique(keys: list[tuple[str, ...]], what: str) -> None:
    seen: set[tuple[str, ...]] = set()
    for key in keys:
        if key in seen:
            raise ValueError(f"duplicate {what}: {'/'.join(key)}")
        seen.add(key)


def _caller_schema(schema: JsonDict) -> None:
    # `name` is required by a CEL rule, not by `required`: the API server
    # skips every CEL rule once a required field is missing, so `{service: x}`
    # would only hear "name: Required value", never why.
    schema.pop("required", None)
    schema["x-kubernetes-validations"] = [
        cel("!has(self.service)", CALLER_SERVICE_REFUSED, field_path=".service"),
        cel("has(self.name)", CALLER_NAME_REQUIRED, field_path=".name"),
    ]


class Caller(ApiModel):
    """A NatsService resource allowed to call this one.

    The grant follows the resource, not a service name: it admits the mesh
    service that resource serves now (its `spec.service`, else its name), and
    nobody while no such resource holds a mesh service. So another resource
    that claims the same service name inherits nothing, and a grant moves with
    the resource when its `spec.service` changes.
    """

    model_config = ConfigDict(json_schema_extra=_caller_schema)

    name: Name
    """Name of the calling NatsService resource (its `metadata.name`, not its
    `spec.service`). It admits whichever mesh service that resource serves, as
    long as the resource exists and holds it (not `SubjectConflict`)."""
    namespace: Name | None = None
    """Namespace of the caller; unset means this service's own namespace."""
    service: Annotated[str, Field(max_length=63)] | None = None
    """Refused: grants name the calling resource in `name`. Kept only so the API
    server can say so, instead of dropping the field and asking for `name`."""

    @model_validator(mode="before")
    @classmethod
    def _no_service(cls, data: object) -> object:
        # Before the fields, as on the server: an old `{service: x}` would
        # otherwise only hear that `name` is missing.
        if isinstance(data, dict):
            if data.get("service") is not None:
                raise ValueError(CALLER_SERVICE_REFUSED)
            if data.get("name") is None:
                raise ValueError(CALLER_NAME_REQUIRED)
        return data


class StreamSettings(ApiModel):
    """The JetStream stream that stores this service's events.

    Each publishing service has one stream (`EVENTS_<service>` in the
    namespace's account) holding all of its topics.
    """

    retention: Literal["limits", "interest", "workqueue"] = "limits"
    """When messages leave the stream: `limits` keeps them until maxAge/maxMsgs/maxBytes,
    `interest` until every subscription acked them, `workqueue` once one consumer acked
    (allows only one subscription per topic)."""
    max_age: Annotated[Duration, DurationRange("1s", "8760h")] = "168h"
    """How long a message is kept at most."""
    max_msgs: Annotated[int, Field(ge=1)] | None = None
    """Most messages kept; unset means no limit besides maxAge."""
    max_bytes: Annotated[int, Field(ge=1)] | None = None
    """Most bytes kept; unset means no limit besides maxAge."""
    replicas: Annotated[int, Field(ge=1, le=5)] = 1
    """Copies of the stream across the NATS cluster."""
    storage: Literal["file", "memory"] = "file"
    """`file` survives a NATS restart, `memory` is faster and does not."""


class Publication(ApiModel):
    """A topic this service publishes, as `POST /_events/<topic>` to its sidecar."""

    topic: Topic
    """Dot-separated lower-case tokens, e.g. `order.created`; the subject is
    `events.<namespace>.<service>.<topic>`."""


class Subscription(ApiModel):
    """Events this service consumes: each becomes an HTTP POST to the app."""

    model_config = ConfigDict(
        json_schema_extra=schema_extra(
            cel(
                "self.delivery != 'atMostOnce' || !has(self.maxDeliver) || self.maxDeliver == 1",
                _AT_MOST_ONCE_REDELIVERY,
                field_path=".maxDeliver",
            ),
            cel(
                "self.delivery != 'atMostOnce' || !has(self.backoff) || size(self.backoff) == 0",
                _AT_MOST_ONCE_BACKOFF,
                field_path=".backoff",
            ),
            cel(
                "self.delivery != 'atMostOnce' || !has(self.ackWait)",
                _AT_MOST_ONCE_ACK_WAIT,
                field_path=".ackWait",
            ),
            cel(
                "!has(self.backoff) || size(self.backoff)"
                f" < (has(self.maxDeliver) ? self.maxDeliver : {DEFAULT_MAX_DELIVER})",
                _BACKOFF_TOO_LONG,
                field_path=".backoff",
            ),
        )
    )

    topic: Topic
    """The publisher's topic, e.g. `order.created`."""
    service: Name
    """The publishing NatsService."""
    namespace: Name | None = None
    """Namespace of the publisher; unset means this service's own namespace."""
    path: HttpPath
    """HTTP path on the app each event is POSTed to, e.g. `/events/order-created`."""
    delivery: Literal["atMostOnce", "atLeastOnce", "exactlyOnce"] = "atLeastOnce"
    """`atMostOnce`: acked on receipt, lost if the app fails. `atLeastOnce`: acked
    after a 2xx from the app, redelivered otherwise. `exactlyOnce`: stored once
    (publish de-duplication on the Idempotency-Key), delivered until acknowledged
    (a double ack the server confirms), and every delivery carries the event's
    stable `Idempotency-Key` header, which the app must de-duplicate on. The
    subscriber's sidecar records each key after the app's 2xx and before the ack
    (a KV bucket of the namespace, shared by its replicas, kept for the
    redelivery window) and does not hand a redelivery with a recorded key to the
    app again; a sidecar that dies after the app answered but before it recorded
    the key still causes a repeat."""
    max_deliver: Annotated[int, Field(ge=1, le=100)] | None = None
    """Deliveries before the event goes to the dead-letter subject; unset means 5
    (1 for atMostOnce)."""
    ack_wait: Annotated[Duration, DurationRange("1s", "12h")] | None = None
    """How long the app may take before a delivery counts as failed; unset means 30s.
    Must be unset for atMostOnce."""
    backoff: Annotated[
        list[Annotated[Duration, DurationRange("1ms", "12h")]],
        Field(max_length=MAX_BACKOFF_STEPS),
    ] = Field(default_factory=list)
    """Waits between redeliveries, e.g. `[1s, 5s, 30s]`; fewer steps than maxDeliver.
    Empty means redeliver after ackWait."""

    @model_validator(mode="after")
    def _delivery_consistent(self) -> Self:
        if self.delivery == "atMostOnce":
            if self.max_deliver not in (None, 1):
                raise ValueError(_AT_MOST_ONCE_REDELIVERY)
            if self.backoff:
                raise ValueError(_AT_MOST_ONCE_BACKOFF)
            if self.ack_wait is not None:
                raise ValueError(_AT_MOST_ONCE_ACK_WAIT)
        if len(self.backoff) >= (self.max_deliver or DEFAULT_MAX_DELIVER):
            raise ValueError(_BACKOFF_TOO_LONG)
        return self

    @property
    def effective_max_deliver(self) -> int:
        if self.delivery == "atMostOnce":
            return 1
        return self.max_deliver or DEFAULT_MAX_DELIVER

    @property
    def ack_wait_ms(self) -> int:
        return parse_duration_ms(self.ack_wait or DEFAULT_ACK_WAIT)

    @property
    def backoff_ms(self) -> list[int]:
        return [parse_duration_ms(step) for step in self.backoff]


class Events(ApiModel):
    """Events this service publishes and consumes through JetStream."""

    stream: StreamSettings = Field(default_factory=StreamSettings)
    """Settings of the stream holding everything this service publishes."""
    publishes: Annotated[list[Publication], Field(max_length=MAX_TOPICS)] = Field(
        default_factory=list,
        json_schema_extra=schema_extra(
            x_kubernetes_list_type="map", x_kubernetes_list_map_keys=["topic"]
        ),
    )
    """Topics this service may publish; each topic at most once."""
    subscriptions: Annotated[list[Subscription], Field(max_length=MAX_SUBSCRIPTIONS)] = Field(
        default_factory=list,
        json_schema_extra=schema_extra(
            x_kubernetes_list_type="map", x_kubernetes_list_map_keys=["service", "topic"]
        ),
    )
    """Topics of other services this one consumes; each pair of service and topic at
    most once, even across namespaces."""

    @model_validator(mode="after")
    def _unique_topics(self) -> Self:
        _unique([(p.topic,) for p in self.publishes], "published topic")
        _unique([(s.service, s.topic) for s in self.subscriptions], "subscription")
        return self


class NatsServiceSpec(ApiModel):
    """Desired state of a NatsService."""

    selector: LabelSelector
    """Pods of this service: they get the sidecar and this service's identity."""
    port: Port
    """The app's HTTP port inside the pod; the sidecar delivers requests and events there."""
    protocol: Literal["http", "grpc"] = "http"
    """How the sidecar calls the app on `port`: `http` (HTTP/1.1) or `grpc` (HTTP/2
    cleartext with prior knowledge, for a gRPC server). Callers reach either the same way
    (gRPC clients with HTTP/2 to their sidecar's outbound listener). Events are delivered
    over HTTP/1.1 whatever the protocol."""
    service: Name | None = None
    """Mesh service these pods serve; unset means the resource's own name. NatsServices
    that share a service name are version subsets of one service, e.g. `orders` (v1)
    and `orders-v2` with `service: orders` and `version: v2` for a canary."""
    version: Version = "v1"
    """Version subset of these pods: requests to it go to
    `mesh.<namespace>.<service>.<version>.<caller-namespace>.<caller>`, and NatsRoute
    destinations pick it by this name."""
    allow_same_namespace: bool = True
    """Every NatsService in the same namespace may call this one. Set to false to allow
    only the NatsServices listed in allowedCallers."""
    allowed_callers: Annotated[list[Caller], Field(max_length=MAX_CALLERS)] = Field(
        default_factory=list
    )
    """Further NatsServices that may call this one, by resource name, e.g. from other
    namespaces. Nobody outside the namespace may call unless listed here; enforced by
    NATS permissions."""
    events: Events = Field(default_factory=Events)
    """Event topics published and consumed."""


class NatsServiceStatus(ApiModel):
    """Observed state of a NatsService, written by the operator."""

    conditions: Annotated[list[Condition], Field(max_length=MAX_CONDITIONS)] = Field(
        default_factory=list, json_schema_extra=CONDITIONS_EXTRA
    )
    """Latest observations: `Ready`, `CredentialsReady`, `StreamsReady`, …"""
    subject: str | None = None
    """NATS subject requests to this service are sent to."""
    endpoints: Annotated[int, Field(ge=0)] | None = None
    """Sidecars of this service currently answering on NATS (`$SRV.PING`).
    Recounted within about a second of a sidecar connecting or
    disconnecting, and on every drift check."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The `metadata.generation` the operator last acted on."""
    user: str | None = None
    """Public NKey of the NATS user in the creds Secret. Replaced (and the
    old one revoked) when the service's permissions narrow or the Secret is lost."""
    credentials_expire: str | None = None
    """When the JWT in the creds Secret expires (RFC 3339); renewed well before."""


class NatsService(CustomResource):
    """A workload on the mesh: identity, callers, events."""

    KIND: ClassVar[str] = "NatsService"
    PLURAL: ClassVar[str] = "natsservices"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("nsvc",)
    PRINTER_COLUMNS: ClassVar[tuple[JsonDict, ...]] = (
        READY_COLUMN,
        printer_column("Subject", ".status.subject", "string", "NATS request subject"),
        printer_column("Endpoints", ".status.endpoints", "integer", "Live sidecars"),
        AGE_COLUMN,
        printer_column("Service", ".spec.service", "string", "Mesh service", priority=1),
        printer_column("Version", ".spec.version", "string", "Version subset", priority=1),
        printer_column("Port", ".spec.port", "integer", "App HTTP port", priority=1),
    )
    SELECTABLE_FIELDS: ClassVar[tuple[str, ...]] = (".spec.service", ".spec.version")

    kind: Literal["NatsService"] = "NatsService"
    spec: NatsServiceSpec
    status: NatsServiceStatus = Field(default_factory=NatsServiceStatus)

    @property
    def service_name(self) -> str:
        """The mesh service: `spec.service`, else the resource name."""
        name = self.spec.service or self.metadata.name
        if name is None:
            raise ValueError("a NatsService needs metadata.name or spec.service")
        return name
