"""The sidecar's own, pydantic-free reading of the wire contract.

:mod:`natsmesh_sidecar.config` (pydantic) stays the single source of truth:
the operator builds, validates and writes tables with it. Importing pydantic
and building those models costs a sidecar about 10 MB of RSS and 0.1 s of
start-up, so the sidecar parses the same JSON here, with ``json`` and small
frozen dataclasses validated by hand against the same rules (types, bounds,
defaults, aliases, unknown fields refused). The attribute names are the
config models' field names, so the data plane reads either.

tests/unit/sidecar/test_sidecar_wire.py proves the two parsers agree: every
table the wiring plan compiles for the examples (and hand-made edge cases)
parses to the same values, and invalid input is refused by both.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from natsmesh_sidecar import readiness, subjects

T = TypeVar("T")
Conv = Callable[[Any, str], Any]


class WireError(ValueError):
    """A table or setting that the config models would refuse too."""


# --------------------------------------------------------------------------
# the types (field names as in natsmesh_sidecar.config)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    path_prefix: str = "/"
    methods: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WeightedDestination:
    subject: str
    version: str = subjects.DEFAULT_VERSION
    weight: int = 100


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int = 0
    per_try_timeout_ms: int = 0
    retry_on: tuple[str, ...] = ("noResponders", "timeout")
    backoff_base_ms: int = 25
    backoff_max_ms: int = 250
    retry_non_idempotent: bool = False
    grpc_retry_on: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class FaultDelay:
    delay_ms: int
    percent: float


@dataclass(frozen=True, slots=True)
class FaultAbort:
    status: int
    percent: float


@dataclass(frozen=True, slots=True)
class Fault:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    consecutive_failures: int = 5
    open_ms: int = 10_000
    half_open_probes: int = 1


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    idle_timeout_ms: int = 0
    window: int = 0


@dataclass(frozen=True, slots=True)
class Rule:
    destinations: tuple[WeightedDestination, ...]
    name: str = "default"
    match: Match = field(default_factory=Match)
    timeout_ms: int = 15_000
    retries: Retries = field(default_factory=Retries)
    fault: Fault | None = None
    circuit_breaker: CircuitBreaker | None = None
    max_body_bytes: int = 0
    stream: StreamPolicy | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    namespace: str
    service: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class Target:
    """One service as its namespace's callers see it (as config.Target)."""

    namespace: str
    service: str
    rules: tuple[Rule, ...]
    generation: str = ""
    admits_namespace: bool = True
    callers: tuple[str, ...] = ()

    def admits(self, caller: str) -> bool:
        """Whether ``caller`` (a service of the same namespace) may call it."""
        return self.admits_namespace or caller in self.callers

    def destination(self) -> Destination:
        return Destination(namespace=self.namespace, service=self.service, rules=self.rules)


@dataclass(frozen=True, slots=True)
class Delivery:
    stream: str
    consumer: str
    topic: str
    source: str
    path: str
    dead_letter_subject: str
    mode: str = "atLeastOnce"
    max_deliver: int = 5
    ack_wait_ms: int = 30_000
    backoff_ms: tuple[int, ...] = ()
    api_prefix: str = subjects.JS_API_PREFIX


@dataclass(frozen=True, slots=True)
class Publication:
    topic: str
    subject: str
    stream: str


@dataclass(frozen=True, slots=True)
class MeshTable:
    namespace: str
    service: str
    generation: str = ""
    known: tuple[str, ...] = ()
    destinations: Mapping[str, Destination] = field(default_factory=dict)
    publishes: Mapping[str, Publication] = field(default_factory=dict)
    subscriptions: tuple[Delivery, ...] = ()


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """What a streamed body (natsmesh_sidecar.transport.stream) may hold and wait for."""

    chunk_bytes: int = 128 * 1024
    window: int = 8
    idle_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Settings:
    """The static ``NATSMESH_*`` settings (as config.SidecarSettings)."""

    service: str
    namespace: str
    version: str = subjects.DEFAULT_VERSION
    nats_url: str = "nats://127.0.0.1:4222"
    creds_file: str | None = None
    app_port: int = 8080
    app_host: str = "127.0.0.1"
    app_protocol: str = "http"
    listen_host: str = "127.0.0.1"
    listen_port: int = 15001
    # All interfaces: probes and metric scrapes come from outside the pod.
    admin_host: str = "0.0.0.0"
    admin_port: int = 15020
    table_file: str | None = None
    max_inflight: int = 256
    drain_seconds: float = 20.0
    # Not in a repr: settings may end up in a log line.
    prestop_token: str = field(default="", repr=False)
    prestop_wait_seconds: float = 10.0
    prestop_hold_seconds: float = 60.0
    idle_timeout_seconds: float = 120.0
    app_idle_timeout_seconds: float = 4.0
    inbound_timeout_seconds: float = 30.0
    inbound_max_bytes: int = 8 * 1024 * 1024
    ready_check: str = "tcp"
    ready_port: int = 0
    ready_period_seconds: float = 1.0
    ready_timeout_seconds: float = 1.0
    ready_failure_threshold: int = 3
    event_dedup: bool = True
    otlp_endpoint: str | None = None
    trace_sample_ratio: float = 1.0
    stream_idle_timeout_seconds: float = 60.0
    stream_chunk_bytes: int = 128 * 1024
    stream_window: int = 8

    def stream_limits(self) -> StreamLimits:
        return StreamLimits(
            chunk_bytes=self.stream_chunk_bytes,
            window=self.stream_window,
            idle_timeout_s=self.stream_idle_timeout_seconds,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        raw = {
            f.name: env[f"NATSMESH_{f.name.upper()}"]
            for f in fields(cls)
            if f"NATSMESH_{f.name.upper()}" in env
        }
        return _build(raw, "settings", _SETTINGS)

    @classmethod
    def coerce(cls, obj: object) -> Settings:
        """These settings from a config.SidecarSettings (or anything with its fields)."""
        if isinstance(obj, Settings):
            return obj
        raw = {f.name: getattr(obj, f.name) for f in fields(cls) if hasattr(obj, f.name)}
        return _build(raw, "settings", _SETTINGS)


# --------------------------------------------------------------------------
# converters: the checks pydantic makes for config's field types
# --------------------------------------------------------------------------


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise WireError(f"{where}: expected a string")
    return v


# Lax like pydantic's default mode: an int field takes true/false, 5.0 and "5";
# a float field takes numbers, booleans and numeric strings; a bool field takes
# 0/1 and the usual words. The operator only ever writes the plain JSON types.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def _int(lo: int | None = None, hi: int | None = None) -> Conv:
    def conv(v: Any, where: str) -> int:
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, str):
            try:
                v = int(v.strip())
            except ValueError:
                raise WireError(f"{where}: expected an integer") from None
        if not isinstance(v, int):
            raise WireError(f"{where}: expected an integer")
        _bounds(v, lo, hi, where)
        return v

    return conv


def _float(lo: float | None = None, hi: float | None = None) -> Conv:
    def conv(v: Any, where: str) -> float:
        if isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                raise WireError(f"{where}: expected a number") from None
        if not isinstance(v, int | float) or v != v:
            raise WireError(f"{where}: expected a number")
        out = float(v)
        _bounds(out, lo, hi, where)
        return out

    return conv


def _bounds(v: float, lo: float | None, hi: float | None, where: str) -> None:
    if lo is not None and v < lo:
        raise WireError(f"{where}: must be >= {lo}")
    if hi is not None and v > hi:
        raise WireError(f"{where}: must be <= {hi}")


def _bool(v: Any, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise WireError(f"{where}: expected true or false")


def _opt(conv: Conv) -> Conv:
    def opt(v: Any, where: str) -> Any:
        return None if v is None else conv(v, where)

    return opt


def _tuple(conv: Conv) -> Conv:
    def tup(v: Any, where: str) -> tuple[Any, ...]:
        if not isinstance(v, list | tuple):
            raise WireError(f"{where}: expected a list")
        return tuple(conv(x, f"{where}[{i}]") for i, x in enumerate(v))

    return tup


def _map(conv: Conv) -> Conv:
    def mapping(v: Any, where: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise WireError(f"{where}: expected an object")
        return {_str(k, where): conv(x, f"{where}.{k}") for k, x in v.items()}

    return mapping


def _literal(*values: str) -> Conv:
    def lit(v: Any, where: str) -> str:
        if v not in values:
            raise WireError(f"{where}: must be one of {', '.join(values)}")
        return str(v)

    return lit


def _ready_check(v: Any, where: str) -> str:
    check = _str(v, where)
    if re.fullmatch(readiness.CHECK_PATTERN, check) is None:
        raise WireError(
            f"{where}: {check!r} is not a readiness check: use tcp, none or an HTTP path"
            " like /healthz"
        )
    return check


_REQUIRED: Any = object()


class _F:
    """One field: its name, JSON alias, converter, and ``default`` None when the
    dataclass has a default (``_REQUIRED`` when the field must be given)."""

    __slots__ = ("alias", "conv", "default", "name")

    def __init__(self, name: str, conv: Conv, default: Any = _REQUIRED, alias: str = "") -> None:
        self.name = name
        self.alias = alias or name
        self.conv = conv
        self.default = default


def _model(cls: type[T], spec: tuple[_F, ...]) -> Conv:
    def conv(v: Any, where: str) -> T:
        return _build(v, where, (cls, spec))

    return conv


def _build(raw: Any, where: str, model: tuple[type[T], tuple[_F, ...]]) -> T:
    cls, spec = model
    if not isinstance(raw, dict):
        raise WireError(f"{where}: expected an object")
    known = {f.alias for f in spec} | {f.name for f in spec}
    extra = sorted(str(k) for k in raw if k not in known)
    if extra:
        raise WireError(f"{where}: unknown field(s) {', '.join(extra)}")
    kwargs: dict[str, Any] = {}
    for f in spec:
        if f.alias in raw:
            value = raw[f.alias]
        elif f.name in raw:
            value = raw[f.name]
        elif f.default is _REQUIRED:
            raise WireError(f"{where}.{f.alias}: field required")
        else:
            continue  # the dataclass default
        kwargs[f.name] = f.conv(value, f"{where}.{f.alias}")
    return cls(**kwargs)


_MATCH = (
    _F("path_prefix", _str, None, "pathPrefix"),
    _F("methods", _tuple(_str), None),
    _F("headers", _map(_str), None),
)
_WD = (
    _F("version", _str, None),
    _F("weight", _int(0, 100), None),
    _F("subject", _str),
)
_RETRIES = (
    _F("attempts", _int(0, 10), None),
    _F("per_try_timeout_ms", _int(0), None, "perTryTimeoutMs"),
    _F("retry_on", _tuple(_str), None, "retryOn"),
    _F("backoff_base_ms", _int(0), None, "backoffBaseMs"),
    _F("backoff_max_ms", _int(0), None, "backoffMaxMs"),
    _F("retry_non_idempotent", _bool, None, "retryNonIdempotent"),
    _F("grpc_retry_on", _tuple(_int(1, 16)), None, "grpcRetryOn"),
)
_DELAY = (_F("delay_ms", _int(0), alias="delayMs"), _F("percent", _float(0, 100)))
_ABORT = (_F("status", _int(200, 599)), _F("percent", _float(0, 100)))
_FAULT = (
    _F("delay", _opt(_model(FaultDelay, _DELAY)), None),
    _F("abort", _opt(_model(FaultAbort, _ABORT)), None),
)
_CB = (
    _F("consecutive_failures", _int(1), None, "consecutiveFailures"),
    _F("open_ms", _int(1), None, "openMs"),
    _F("half_open_probes", _int(1), None, "halfOpenProbes"),
)
_STREAM = (
    _F("idle_timeout_ms", _int(0), None, "idleTimeoutMs"),
    _F("window", _int(0, 256), None),
)
_RULE = (
    _F("name", _str, None),
    _F("match", _model(Match, _MATCH), None),
    _F("destinations", _tuple(_model(WeightedDestination, _WD))),
    _F("timeout_ms", _int(1), None, "timeoutMs"),
    _F("retries", _model(Retries, _RETRIES), None),
    _F("fault", _opt(_model(Fault, _FAULT)), None),
    _F("circuit_breaker", _opt(_model(CircuitBreaker, _CB)), None, "circuitBreaker"),
    _F("max_body_bytes", _int(0), None, "maxBodyBytes"),
    _F("stream", _opt(_model(StreamPolicy, _STREAM)), None),
)
_DEST = (
    _F("namespace", _str),
    _F("service", _str),
    _F("rules", _tuple(_model(Rule, _RULE))),
)
_DELIVERY = (
    _F("stream", _str),
    _F("consumer", _str),
    _F("topic", _str),
    _F("source", _str),
    _F("path", _str),
    _F("mode", _literal("atMostOnce", "atLeastOnce", "exactlyOnce"), None),
    _F("max_deliver", _int(1), None, "maxDeliver"),
    _F("ack_wait_ms", _int(1), None, "ackWaitMs"),
    _F("backoff_ms", _tuple(_int()), None, "backoffMs"),
    _F("dead_letter_subject", _str, alias="deadLetterSubject"),
    _F("api_prefix", _str, None, "apiPrefix"),
)
_PUB = (_F("topic", _str), _F("subject", _str), _F("stream", _str))
_TABLE = (
    _F("namespace", _str),
    _F("service", _str),
    _F("generation", _str, None),
    _F("known", _tuple(_str), None),
    _F("destinations", _map(_model(Destination, _DEST)), None),
    _F("publishes", _map(_model(Publication, _PUB)), None),
    _F("subscriptions", _tuple(_model(Delivery, _DELIVERY)), None),
)
_TARGET = (
    _F("namespace", _str),
    _F("service", _str),
    _F("generation", _str, None),
    _F("admits_namespace", _bool, None, "admitsNamespace"),
    _F("callers", _tuple(_str), None),
    _F("rules", _tuple(_model(Rule, _RULE))),
)
_SETTINGS = (
    Settings,
    (
        _F("service", _str),
        _F("namespace", _str),
        _F("version", _str, None),
        _F("nats_url", _str, None),
        _F("creds_file", _opt(_str), None),
        _F("app_port", _int(1, 65535), None),
        _F("app_host", _str, None),
        _F("app_protocol", _literal("http", "grpc"), None),
        _F("listen_host", _str, None),
        _F("listen_port", _int(0, 65535), None),
        _F("admin_host", _str, None),
        _F("admin_port", _int(0, 65535), None),
        _F("table_file", _opt(_str), None),
        _F("max_inflight", _int(1), None),
        _F("drain_seconds", _float(0), None),
        _F("prestop_token", _str, None),
        _F("prestop_wait_seconds", _float(0), None),
        _F("prestop_hold_seconds", _float(0), None),
        _F("idle_timeout_seconds", _float(0), None),
        _F("app_idle_timeout_seconds", _float(0), None),
        _F("inbound_timeout_seconds", _float(0), None),
        _F("inbound_max_bytes", _int(1), None),
        _F("ready_check", _ready_check, None),
        _F("ready_port", _int(0, 65535), None),
        _F("ready_period_seconds", _float(0), None),
        _F("ready_timeout_seconds", _float(0), None),
        _F("ready_failure_threshold", _int(1), None),
        _F("event_dedup", _bool, None),
        _F("otlp_endpoint", _opt(_str), None),
        _F("trace_sample_ratio", _float(0, 1), None),
        _F("stream_idle_timeout_seconds", _float(0), None),
        _F("stream_chunk_bytes", _int(1024, 512 * 1024), None),
        _F("stream_window", _int(1, 256), None),
    ),
)


def invalid_subject(rules: Iterable[Rule]) -> str | None:
    """The first destination subject of ``rules`` that cannot be published to.

    Subjects skip nats-py's validation on the hot path, so they are checked
    once, when a table or target arrives.
    """
    for rule in rules:
        for wd in rule.destinations:
            if not wd.subject or any(c in wd.subject for c in " \t\r\n"):
                return wd.subject
    return None


def _parse(raw: bytes | str, where: str, model: tuple[type[T], tuple[_F, ...]]) -> T:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"{where} is not JSON: {exc}") from None
    return _build(data, where, model)


def parse_table(raw: bytes | str) -> MeshTable:
    """A :class:`MeshTable` from its KV/file JSON; :class:`WireError` if config would refuse it."""
    return _parse(raw, "table", (MeshTable, _TABLE))


def parse_target(raw: bytes | str) -> Target:
    """A :class:`Target` from its KV JSON; :class:`WireError` if config would refuse it."""
    return _parse(raw, "target", (Target, _TARGET))


def coerce_table(table: object) -> MeshTable:
    """A wire table from itself or from a config.MeshTable (tests and tools build those)."""
    if isinstance(table, MeshTable):
        return table
    to_json = getattr(table, "to_json", None)
    if to_json is None:
        raise TypeError(f"not a route table: {type(table).__name__}")
    return parse_table(to_json())


def empty_table(namespace: str, service: str) -> MeshTable:
    return MeshTable(namespace=namespace, service=service)
