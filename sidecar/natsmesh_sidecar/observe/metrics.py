"""Prometheus metrics and the admin HTTP server (/metrics, /healthz, /readyz, /prestop).

Each sidecar instance owns its metrics (tests run several in one process).
The text exposition (format 0.0.4) is written here, not by prometheus_client:
importing that library (with the HTTP, WSGI and ASGI servers it brings) cost
about 2 MB of each sidecar's RSS, and its Counter and Histogram took a lock per
call on the hot path. ``tests/unit/sidecar/test_sidecar_metrics.py`` checks
the output against prometheus_client's own, sample for sample (less the
``_created`` series, which the text format's scrapers ignore).
"""

from __future__ import annotations

import asyncio
import bisect
import hmac
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterator

from natsmesh_sidecar.logthrottle import LogThrottle
from natsmesh_sidecar.readiness import PRESTOP_HEADER, PRESTOP_PATH

logger = logging.getLogger(__name__)

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LE = [repr(b) for b in _BUCKETS]
_LABELS = ("direction", "source", "destination", "status")
#: A gRPC call's status code (``grpc-status``, 0-16, what the client got), on
#: gRPC calls only: an HTTP call's series has no such label (an empty label
#: is no label to Prometheus), so HTTP traffic adds no series.
GRPC_LABEL = "grpc_status"
Key = tuple[str, str, str, int, str]
#: Label sets kept apart; past this, destinations are folded into "_other"
#: (hosts come from clients, so they must not grow the registry forever).
MAX_SERIES = 2000
#: Distinct ``source`` values kept. The source is what a caller's message says
#: (``Nm-Source``): any caller could otherwise add a series per request.
#: Destinations come from this sidecar's own route table, bounded by MAX_SERIES.
MAX_SOURCES = 256
OTHER = "_other"
#: A label value we keep as it is: a ``service.namespace`` host or a path-less
#: destination key. Anything else (long, odd bytes) is folded into OTHER.
_LABEL_RE = re.compile(r"[a-z0-9_-][a-z0-9_.-]{0,252}")

#: (sample name, labels, value)
Sample = tuple[str, dict[str, str], float]


def _number(value: float) -> str:
    """A sample value as Prometheus' Go code writes it (prometheus_client's floatToGoString)."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return text


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Family:
    """One metric family: what it is and its samples at scrape time."""

    name = ""
    kind = ""
    help = ""

    def samples(self) -> Iterator[Sample]:
        raise NotImplementedError

    def render(self, out: list[str]) -> None:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {self.name} {help_text}\n# TYPE {self.name} {self.kind}\n")
        for name, labels, value in self.samples():
            if labels:
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
                out.append(f"{name}{{{text}}} {_number(value)}\n")
            else:
                out.append(f"{name} {_number(value)}\n")


class Child:
    """One label set of a counter or gauge: a plain float, or a function read at scrape time."""

    __slots__ = ("fn", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.fn: Callable[[], float] | None = None

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = float(value)

    def set_function(self, fn: Callable[[], float]) -> None:
        self.fn = fn

    def get(self) -> float:
        return float(self.fn()) if self.fn is not None else self.value


class Metric(_Family):
    """A counter or gauge, with or without labels (``.labels(...)`` like prometheus_client)."""

    def __init__(self, name: str, help: str, kind: str, labelnames: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.help = help
        self.name = name + "_total" if kind == "counter" else name
        self.labelnames = labelnames
        self.children: dict[tuple[str, ...], Child] = {}
        self._only = Child()
        if not labelnames:
            self.children[()] = self._only

    def labels(self, *values: object) -> Child:
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {key}")
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = Child()
        return child

    def inc(self, amount: float = 1.0) -> None:
        self._only.inc(amount)

    def set(self, value: float) -> None:
        self._only.set(value)

    def set_function(self, fn: Callable[[], float]) -> None:
        self._only.set_function(fn)

    def samples(self) -> Iterator[Sample]:
        for key, child in list(self.children.items()):
            yield self.name, dict(zip(self.labelnames, key, strict=True)), child.get()


class _Series:
    """Count, sum and per-bucket counts of one label set: plain ints, no lock.

    The sidecar is one event loop: nothing else writes these concurrently.
    """

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * (len(_BUCKETS) + 1)


def _labels(key: Key) -> dict[str, str]:
    direction, source, dest, status, grpc_status = key
    labels = dict(zip(_LABELS, (direction, source, dest, str(status)), strict=True))
    if grpc_status:
        labels[GRPC_LABEL] = grpc_status
    return labels


class _RequestCount(_Family):
    kind = "counter"
    help = "Requests handled"

    def __init__(self, prefix: str, series: dict[Key, _Series]) -> None:
        self.name = prefix + "requests_total"
        self.series = series

    def samples(self) -> Iterator[Sample]:
        for key, s in list(self.series.items()):
            yield self.name, _labels(key), float(s.count)


class _RequestDuration(_Family):
    kind = "histogram"
    help = "Request latency as seen by this sidecar"

    def __init__(self, prefix: str, series: dict[Key, _Series]) -> None:
        self.name = prefix + "request_duration_seconds"
        self.series = series

    def samples(self) -> Iterator[Sample]:
        for key, s in list(self.series.items()):
            labels = _labels(key)
            acc = 0
            for le, n in zip(_LE, s.buckets, strict=False):
                acc += n
                yield self.name + "_bucket", {**labels, "le": le}, float(acc)
            yield self.name + "_bucket", {**labels, "le": "+Inf"}, float(s.count)
            yield self.name + "_count", labels, float(s.count)
            yield self.name + "_sum", labels, s.sum


class Registry:
    """The families of one sidecar, in exposition order."""

    def __init__(self) -> None:
        self.families: list[_Family] = []

    def register(self, family: _Family) -> None:
        self.families.append(family)

    def render(self) -> bytes:
        out: list[str] = []
        for family in self.families:
            family.render(out)
        return "".join(out).encode()

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's value, or None (as prometheus_client's registry answers)."""
        want = labels or {}
        for family in self.families:
            for sample, have, value in family.samples():
                if sample == name and have == want:
                    return value
        return None


class _RequestCollector:
    """``requests_total`` and ``request_duration_seconds``: plain ints per label set.

    prometheus_client's Counter.inc and Histogram.observe each took a lock and
    walked the buckets in Python per call; the hot path only bumps ints and
    the families read them at scrape time.
    """

    def __init__(self, prefix: str) -> None:
        self.series: dict[Key, _Series] = {}
        self.families = (_RequestCount(prefix, self.series), _RequestDuration(prefix, self.series))


class Metrics:
    def __init__(self) -> None:
        r = self.registry = Registry()
        p = "natsmesh_sidecar_"

        def metric(name: str, help: str, kind: str, *labels: str) -> Metric:
            family = Metric(p + name, help, kind, labels)
            r.register(family)
            return family

        self.requests = _RequestCollector(p)
        for family in self.requests.families:
            r.register(family)
        self.inflight = metric("inflight_requests", "Requests in flight", "gauge", "direction")
        self.retries = metric("retries", "Retried attempts", "counter", "destination")
        self.circuit = metric(
            "circuit_state",
            "Circuit state per destination subject (0 closed, 1 open, 2 half-open)",
            "gauge",
            "destination",
        )
        self.circuit_refused = metric(
            "circuit_refused",
            "Calls refused by an open circuit (503 circuit_open) per destination subject",
            "counter",
            "destination",
        )
        self.events_published = metric(
            "events_published", "Events acknowledged by JetStream", "counter", "topic"
        )
        self.events_delivered = metric(
            "events_delivered", "Event deliveries to the app", "counter", "topic", "result"
        )
        self.events_dedup_unavailable = metric(
            "events_dedup_unavailable",
            "exactlyOnce: completed-key lookups or writes that failed (the event was delivered)",
            "counter",
            "topic",
            "op",
        )
        # By subscription (publisher and topic): a service may take one topic
        # from two publishers, whose consumers lag and dead-letter apart.
        self.events_dead = metric(
            "events_dead_lettered",
            "Events sent to the dead-letter subject",
            "counter",
            "source",
            "topic",
        )
        self.nats_connected = metric("nats_connected", "1 while connected to NATS", "gauge")
        self.nats_reconnects = metric("nats_reconnects", "NATS reconnections", "counter")
        self.creds_renewals = metric(
            "creds_renewals",
            "New creds taken up: a second connection opened, then the old one drained",
            "counter",
        )
        self.creds_renewal_failures = metric(
            "creds_renewal_failures",
            "New creds not taken up (yet): the server refused them or the new connection"
            " could not be set up in time; the current connection carries on, tried again"
            " after a backoff (up to a minute)",
            "counter",
        )
        self.lame_duck_moves = metric(
            "nats_lame_duck_moves",
            "Moves off a server in lame duck mode: a connection to another, then the old drained",
            "counter",
        )
        self.lame_duck_move_failures = metric(
            "nats_lame_duck_move_failures",
            "Lame duck notices not followed by a move (no other server reachable, or the"
            " new connection failed): the connection stays until the server drops it",
            "counter",
        )
        self.nats_errors = metric(
            "nats_async_errors", "Asynchronous NATS errors", "counter", "kind"
        )
        self.events_pending = metric(
            "events_pending",
            "Messages left in the consumer after the last one delivered here (consumer lag)",
            "gauge",
            "source",
            "topic",
        )
        self.table_swaps = metric("table_updates", "Route tables applied", "counter")
        self.creds_expiry = metric(
            "creds_expiry_timestamp_seconds",
            "Expiry of the NATS user JWT in use, Unix seconds (0: none or no creds)",
            "gauge",
        )
        self.creds_issued = metric(
            "creds_issued_timestamp_seconds",
            "Issue time of the NATS user JWT in use, Unix seconds (0: unknown or no creds)",
            "gauge",
        )
        self._sources: set[str] = set()
        self._destinations: set[str] = set()
        self.inflight_out = self.inflight.labels("outbound")
        self.inflight_in = self.inflight.labels("inbound")

    def observe(
        self,
        direction: str,
        source: str,
        destination: str,
        status: int,
        seconds: float,
        grpc_status: str = "",
    ) -> None:
        """One request; ``grpc_status`` (a code, natsmesh_sidecar.edge.grpcwire.status_value)
        for a gRPC call only."""
        series = self.requests.series
        key = (direction, source, destination, status, grpc_status)
        s = series.get(key)
        if s is None:
            # Only a new label set pays for the checks: known ones were admitted.
            source = self._admit(self._sources, source, MAX_SOURCES)
            destination = self._admit(self._destinations, destination, MAX_SERIES)
            if len(series) >= MAX_SERIES:
                destination = OTHER
            key = (direction, source, destination, status, grpc_status)
            s = series.get(key)
            if s is None:
                s = series[key] = _Series()
                if direction == "outbound" and destination != "-":
                    # A destination called shows 0 retries, not no series: a
                    # dashboard or alert on retries must not read "no data".
                    self.retries.labels(destination)
        s.count += 1
        s.sum += seconds
        s.buckets[bisect.bisect_left(_BUCKETS, seconds)] += 1

    @staticmethod
    def _admit(seen: set[str], value: str, cap: int) -> str:
        """``value`` itself while its label has room and it looks sane, else OTHER."""
        if value in seen:
            return value
        if len(seen) >= cap or _LABEL_RE.fullmatch(value) is None:
            return OTHER
        seen.add(value)
        return value

    def render(self) -> bytes:
        return self.registry.render()


class AdminServer:
    """A tiny HTTP/1.0-style server: one request per connection, GET only.

    ``/prestop`` is the kubelet's preStop hook of the app container (an
    ``httpGet`` the webhook adds): it awaits ``prestop`` (leave the queue
    group, finish what the app holds; False: refused, 409) before the
    kubelet sends the app its SIGTERM. The port is open to the pod network (probes, scrapes), so the
    call must carry the pod's token; without one configured it is 404.
    """

    def __init__(
        self,
        metrics: Metrics,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        prestop: Callable[[], Awaitable[bool]] | None = None,
        prestop_token: str = "",
    ) -> None:
        self.metrics = metrics
        self.healthy = healthy
        self.ready = ready
        self.prestop = prestop
        self._token = prestop_token.encode()
        self._refusals = LogThrottle(30.0)
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            parts = head.split(b" ", 2)
            path = parts[1].decode("latin-1") if len(parts) > 1 else "/"
            path = path.split("?", 1)[0]
            ctype = b"text/plain; charset=utf-8"
            if path == "/metrics":
                status, body = 200, self.metrics.render()
                ctype = b"text/plain; version=0.0.4; charset=utf-8"
            elif path == "/healthz":
                ok = self.healthy()
                status, body = (200, b"ok\n") if ok else (503, b"unhealthy\n")
            elif path == "/readyz":
                ok = self.ready()
                status, body = (200, b"ready\n") if ok else (503, b"not ready\n")
            elif path == PRESTOP_PATH and self.prestop is not None and self._token:
                if hmac.compare_digest(_header(head, _PRESTOP_KEY), self._token):
                    if await self.prestop():
                        status, body = 200, b"left the queue group\n"
                    else:
                        status, body = 409, b"already stopped once; the app has not restarted\n"
                else:
                    held = self._refusals.allow("prestop")
                    if held is not None:
                        # Throttled: whoever probes the port must not flood the log.
                        logger.warning("/prestop refused: no or wrong token (%d more)", held)
                    status, body = 403, b"forbidden\n"
            else:
                status, body = 404, b"not found\n"
            writer.write(
                b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, ctype, len(body), body)
            )
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            pass
        except Exception:
            logger.exception("admin request failed")
        finally:
            writer.close()


def _header(head: bytes, name: bytes) -> bytes:
    """The value of header ``name`` (lower case) in a request head, b"" if absent."""
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return b""


#: PRESTOP_HEADER as :func:`_header` looks it up.
_PRESTOP_KEY = PRESTOP_HEADER.lower().encode()
