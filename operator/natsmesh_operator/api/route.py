"""The NatsRoute custom resource: traffic policy for calls to one service.

Like Istio's VirtualService plus DestinationRule: ordered rules, each with a
match, weighted version destinations, a timeout, retries, fault injection and
a circuit breaker. The operator compiles it into the route table
(:class:`natsmesh_sidecar.config.Rule`) that every caller's sidecar applies.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, Self

from pydantic import ConfigDict, Field, field_validator, model_validator

from natsmesh_operator.api.common import (
    CONDITIONS_EXTRA,
    MAX_CONDITIONS,
    MAX_DESTINATIONS,
    MAX_HEADERS,
    MAX_RETRY_CODES,
    MAX_RULES,
    ApiModel,
    Condition,
    Duration,
    DurationRange,
    HttpPath,
    JsonDict,
    Name,
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

HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
RetryCondition = Literal["noResponders", "timeout", "5xx"]
#: gRPC statuses a route may retry, as gRPC's own service config spells them
#: (``retryableStatusCodes``), and their numbers (what the route table carries).
#: The transient ones (Istio's gRPC retryOn list): the others (INVALID_ARGUMENT,
#: NOT_FOUND, PERMISSION_DENIED...) are the app's answer about the request,
#: which a second try repeats.
GRPC_RETRYABLE: dict[str, int] = {
    "CANCELLED": 1,
    "DEADLINE_EXCEEDED": 4,
    "RESOURCE_EXHAUSTED": 8,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
}
GrpcRetryStatus = Literal[
    "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE"
]
#: Header names as the sidecar sees them: lower-case HTTP tokens.
HEADER_NAME_PATTERN = r"^[a-z0-9][-a-z0-9_.]*$"
_HEADER_NAME_RE = re.compile(HEADER_NAME_PATTERN)
DEFAULT_TIMEOUT = "15s"
#: Bounds of a rule's ``stream`` settings; the callee's sidecar clamps what a
#: stream's head asks for to the same (natsmesh_sidecar.transport.stream.protocol).
MAX_STREAM_WINDOW = 64
STREAM_IDLE_RANGE = DurationRange("1s", "1h")
#: 1 TiB: a bound for the schema, not a size anyone should send through a mesh.
MAX_BODY_BYTES = 1 << 40

_HEADER_NAMES = "header names must be lower-case, e.g. x-canary"
_WEIGHTS = "destination weights must sum to 100"
_PER_TRY = "retries.perTryTimeout must be shorter than timeout"
_FAULT_DELAY = "fault.delay.fixedDelay must be shorter than timeout"
_NOTHING_TO_RETRY = "retries with attempts > 0 need retryOn, retryOnCodes or retryOnGrpc"
_BACKOFF_ORDER = "backoff.max must not be shorter than backoff.base"
_FAULT_EMPTY = "fault must set delay or abort"
_RULE_NAMES = "rule names must be unique"

Percent = Annotated[float, Field(ge=0, le=100)]


class Match(ApiModel):
    """Which requests a rule applies to; every part given must match."""

    path_prefix: HttpPath = "/"
    """Requests whose path starts with this."""
    methods: Annotated[list[HttpMethod], Field(max_length=7)] = Field(
        default_factory=list, json_schema_extra=schema_extra(x_kubernetes_list_type="set")
    )
    """HTTP methods; empty means any."""
    headers: Annotated[
        dict[str, Annotated[str, Field(max_length=256)]], Field(max_length=MAX_HEADERS)
    ] = Field(
        default_factory=dict,
        json_schema_extra=schema_extra(
            cel(f"self.all(k, k.matches('{HEADER_NAME_PATTERN}'))", _HEADER_NAMES)
        ),
    )
    """Exact values of request headers, keyed by lower-case header name."""

    @field_validator("headers")
    @classmethod
    def _lower_case_names(cls, headers: dict[str, str]) -> dict[str, str]:
        if not all(_HEADER_NAME_RE.match(name) for name in headers):
            raise ValueError(_HEADER_NAMES)
        return headers


class Destination(ApiModel):
    """A version subset and the share of matching requests it gets."""

    version: Version
    """Version of the target service, as in its NatsService `spec.version`."""
    weight: Annotated[int, Field(ge=0, le=100)] = 100
    """Percent of the rule's requests; the weights of a rule sum to 100."""


class RetryBackoff(ApiModel):
    """Exponential backoff between tries, with jitter, from base up to max."""

    model_config = ConfigDict(
        json_schema_extra=schema_extra(
            cel("duration(self.base) <= duration(self.max)", _BACKOFF_ORDER, field_path=".max")
        )
    )

    base: Annotated[Duration, DurationRange("1ms", "1m")] = "25ms"
    """Wait before the first retry; doubles for each further one."""
    max: Annotated[Duration, DurationRange("1ms", "5m")] = "250ms"
    """Longest wait between tries."""

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if parse_duration_ms(self.base) > parse_duration_ms(self.max):
            raise ValueError(_BACKOFF_ORDER)
        return self


class Retries(ApiModel):
    """Retrying failed calls."""

    model_config = ConfigDict(
        json_schema_extra=schema_extra(
            cel(
                "self.attempts == 0 || size(self.retryOn) > 0"
                " || (has(self.retryOnCodes) && size(self.retryOnCodes) > 0)"
                " || (has(self.retryOnGrpc) && size(self.retryOnGrpc) > 0)",
                _NOTHING_TO_RETRY,
                field_path=".retryOn",
            )
        )
    )

    attempts: Annotated[int, Field(ge=0, le=10)] = 2
    """Retries after the first try."""
    per_try_timeout: Annotated[Duration, DurationRange("1ms", "1h")] | None = None
    """Timeout of each try; shorter than the rule's timeout. Unset means each try may
    use what is left of the rule's timeout."""
    retry_on: Annotated[list[RetryCondition], Field(max_length=3)] = Field(
        default=["noResponders", "timeout"],
        json_schema_extra=schema_extra(x_kubernetes_list_type="set"),
    )
    """Failures to retry: `noResponders` (no sidecar of the service is up), `timeout`
    (a try timed out), `5xx` (the app answered 500-599)."""
    retry_on_codes: Annotated[
        list[Annotated[int, Field(ge=400, le=599)]], Field(max_length=MAX_RETRY_CODES)
    ] = Field(default_factory=list, json_schema_extra=schema_extra(x_kubernetes_list_type="set"))
    """Further HTTP statuses to retry, e.g. `[429, 503]`."""
    retry_on_grpc: Annotated[list[GrpcRetryStatus], Field(max_length=len(GRPC_RETRYABLE))] = Field(
        default_factory=list, json_schema_extra=schema_extra(x_kubernetes_list_type="set")
    )
    """gRPC statuses that retry a gRPC call, e.g. `[UNAVAILABLE]`; empty (the
    default): a gRPC call is retried only when nobody heard it (`noResponders`
    in `retryOn`). Listing a status says the rule's methods are safe to call
    twice (gRPC calls are all POST, so `retryNonIdempotent` does not apply to
    them): match only idempotent methods, e.g. `pathPrefix:
    /shop.Orders/Get`. A call is retried only while its caller's sidecar
    still holds the whole request (the client's messages, up to 128 KiB) and
    nothing of the response has reached the client: a trailers-only answer
    with one of these statuses, or the mesh's own answer with it
    (`DEADLINE_EXCEEDED`: a try that outlived `perTryTimeout`)."""
    backoff: RetryBackoff = Field(default_factory=RetryBackoff)
    """Wait between tries."""
    retry_non_idempotent: bool = False
    """Retry POST and PATCH too; off because the app may already have acted."""

    @model_validator(mode="after")
    def _something_to_retry(self) -> Self:
        if self.attempts and not (self.retry_on or self.retry_on_codes or self.retry_on_grpc):
            raise ValueError(_NOTHING_TO_RETRY)
        return self


class FaultDelay(ApiModel):
    """Delay a share of requests before they are sent."""

    fixed_delay: Annotated[Duration, DurationRange("1ms", "1h")]
    """How long to delay."""
    percent: Percent = 100
    """Share of requests delayed, 0-100."""


class FaultAbort(ApiModel):
    """Answer a share of requests with an error instead of sending them."""

    http_status: Annotated[int, Field(ge=400, le=599)]
    """Status returned to the caller."""
    percent: Percent = 100
    """Share of requests aborted, 0-100."""


class Fault(ApiModel):
    """Fault injection, for testing how callers cope."""

    model_config = ConfigDict(
        json_schema_extra=schema_extra(cel("has(self.delay) || has(self.abort)", _FAULT_EMPTY))
    )

    delay: FaultDelay | None = None
    """Added latency."""
    abort: FaultAbort | None = None
    """Injected errors."""

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if self.delay is None and self.abort is None:
            raise ValueError(_FAULT_EMPTY)
        return self


class CircuitBreaker(ApiModel):
    """Stop sending to a failing service for a while (per caller sidecar).

    It counts requests, each once with its outcome after retries: a retry that
    got through is a success. A failure is a 5xx answered on the callee's side
    (its app, or its sidecar: app unreachable 502, app timeout 504, overloaded
    503) or no answer within the timeout. Not counted either way: the caller's
    own NATS connection being down or reconnecting (503 nats_unavailable), a
    publish the server refused, a body too large, and no responders (nobody
    subscribed, e.g. between the replicas of a rollout: it fails fast already)."""

    consecutive_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    """Failed requests in a row (callee 5xx or timeout, after retries) that open the circuit."""
    open_duration: Annotated[Duration, DurationRange("1s", "1h")] = "10s"
    """How long the circuit stays open; callers get 503 with Retry-After meanwhile."""
    half_open_requests: Annotated[int, Field(ge=1, le=100)] = 1
    """Trial requests let through after that; success closes the circuit, failure
    opens it again."""


class StreamSettings(ApiModel):
    """How a streamed call of this rule behaves: a body past one NATS message
    (about 1 MiB), a response the app writes over time (Server-Sent Events),
    or a WebSocket. Unset fields take the sidecar's settings."""

    idle_timeout: Annotated[Duration, STREAM_IDLE_RANGE] | None = None
    """Once a call streams, the route's `timeout` no longer applies: the stream is
    cut when the other sidecar was silent this long (both beat every quarter of
    it, so a quiet SSE feed or WebSocket lives on), and a request body that
    stops arriving is cut after this long without a chunk (the caller gets 502).
    Unset: `NATSMESH_STREAM_IDLE_TIMEOUT_SECONDS` (60s). Sent to the callee's
    sidecar with the call, so both ends keep the same clock."""
    window: Annotated[int, Field(ge=1, le=MAX_STREAM_WINDOW)] | None = None
    """Chunks (128 KiB each) in flight per direction before the receiving
    sidecar grants more: the caller's grants it for the response (and a
    WebSocket's app-to-client bytes), the callee's for the request body (and
    client-to-app bytes). Larger is faster over a slow link and holds more
    memory per stream. Unset: `NATSMESH_STREAM_WINDOW` (8)."""


class Rule(ApiModel):
    """One routing rule: requests it matches and how they are sent."""

    model_config = ConfigDict(
        json_schema_extra=schema_extra(
            cel(
                "self.destinations.map(d, d.weight).sum() == 100",
                _WEIGHTS,
                field_path=".destinations",
            ),
            cel(
                "!has(self.retries) || !has(self.retries.perTryTimeout)"
                " || duration(self.retries.perTryTimeout) < duration(self.timeout)",
                _PER_TRY,
                field_path=".retries.perTryTimeout",
            ),
            cel(
                "!has(self.fault) || !has(self.fault.delay)"
                " || duration(self.fault.delay.fixedDelay) < duration(self.timeout)",
                _FAULT_DELAY,
                field_path=".fault.delay.fixedDelay",
            ),
        )
    )

    name: Name | None = None
    """Identifies the rule in metrics and logs; unique within the route."""
    match: Match = Field(default_factory=Match)
    """Requests this rule applies to; unset matches every request."""
    destinations: Annotated[list[Destination], Field(min_length=1, max_length=MAX_DESTINATIONS)] = (
        Field(
            json_schema_extra=schema_extra(
                x_kubernetes_list_type="map", x_kubernetes_list_map_keys=["version"]
            )
        )
    )
    """Version subsets and their weights, e.g. 90 to `v1` and 10 to `v2`."""
    timeout: Annotated[Duration, DurationRange("1ms", "1h")] = DEFAULT_TIMEOUT
    """Time for the whole call, retries included; the caller then gets 504."""
    retries: Retries | None = None
    """Retry policy; unset means no retries."""
    fault: Fault | None = None
    """Fault injection; unset means none."""
    circuit_breaker: CircuitBreaker | None = None
    """Circuit breaking; unset means none."""
    max_body_bytes: Annotated[int, Field(ge=1, le=MAX_BODY_BYTES)] | None = None
    """Largest request body the caller's sidecar sends, in bytes. A larger
    Content-Length is answered 413 before anything is sent; a chunked body
    that outgrows it is cut on its way (the callee's app sees its request
    aborted) and answered 413. Unset: no limit of the rule's own (a body past
    one NATS message streams, whatever its size). Not applied to WebSockets."""
    stream: StreamSettings | None = None
    """Idle timeout and window of the rule's streamed calls; unset, the sidecar's."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        total = sum(d.weight for d in self.destinations)
        if total != 100:
            raise ValueError(f"{_WEIGHTS}, not {total}")
        if len({d.version for d in self.destinations}) != len(self.destinations):
            raise ValueError("destination versions must be unique")
        timeout_ms = parse_duration_ms(self.timeout)
        per_try = self.retries.per_try_timeout if self.retries else None
        if per_try is not None and parse_duration_ms(per_try) >= timeout_ms:
            raise ValueError(_PER_TRY)
        delay = self.fault.delay if self.fault else None
        if delay is not None and parse_duration_ms(delay.fixed_delay) >= timeout_ms:
            raise ValueError(_FAULT_DELAY)
        return self

    @property
    def timeout_ms(self) -> int:
        return parse_duration_ms(self.timeout)


class NatsRouteSpec(ApiModel):
    """Desired traffic policy for calls to one NatsService."""

    service: Name
    """The NatsService in this namespace whose callers this policy applies to."""
    rules: Annotated[list[Rule], Field(min_length=1, max_length=MAX_RULES)] = Field(
        json_schema_extra=schema_extra(
            cel(
                "self.all(r, !has(r.name) || self.exists_one(s, has(s.name) && s.name == r.name))",
                _RULE_NAMES,
            )
        )
    )
    """Ordered: the first rule whose match fits a request decides. Requests no rule
    matches get the default policy: version `v1` (or the service's only version), a 15s
    timeout, no retries."""

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [r.name for r in self.rules if r.name is not None]
        if len(set(names)) != len(names):
            raise ValueError(_RULE_NAMES)
        return self


class NatsRouteStatus(ApiModel):
    """Observed state of a NatsRoute, written by the operator."""

    conditions: Annotated[list[Condition], Field(max_length=MAX_CONDITIONS)] = Field(
        default_factory=list, json_schema_extra=CONDITIONS_EXTRA
    )
    """Latest observations: `Ready` once the route is compiled into the route
    tables as written. A destination version with no usable NatsService
    (none, or one that is `InconsistentSubsets`) is dropped from its rules,
    the rest of the route still applied: then `Ready` is `False` with
    reason `VersionsDropped`, and the message names each dropped version,
    why, and where its traffic goes instead."""
    rule_count: Annotated[int, Field(ge=0)] | None = None
    """Rules compiled into the route table (a printer column: JSONPath cannot count)."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The `metadata.generation` the operator last acted on."""


class NatsRoute(CustomResource):
    """Traffic policy for calls to one NatsService."""

    KIND: ClassVar[str] = "NatsRoute"
    PLURAL: ClassVar[str] = "natsroutes"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("nroute",)
    PRINTER_COLUMNS: ClassVar[tuple[JsonDict, ...]] = (
        printer_column("Service", ".spec.service", "string", "Target NatsService"),
        printer_column("Rules", ".status.ruleCount", "integer", "Rules in the route table"),
        READY_COLUMN,
        AGE_COLUMN,
    )
    SELECTABLE_FIELDS: ClassVar[tuple[str, ...]] = (".spec.service",)

    kind: Literal["NatsRoute"] = "NatsRoute"
    spec: NatsRouteSpec
    status: NatsRouteStatus = Field(default_factory=NatsRouteStatus)
