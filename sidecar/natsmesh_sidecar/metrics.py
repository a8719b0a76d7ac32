"""Prometheus metrics and the admin HTTP server (/metrics, /healthz, /readyz).

Each sidecar instance owns a registry (tests run several in one process). Label
children are cached in plain dicts: ``Counter.labels()`` costs a lock and a
tuple build per call, too much for every request.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import re
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)

logger = logging.getLogger(__name__)

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LE = [repr(b) for b in _BUCKETS]
_LABELS = ["direction", "source", "destination", "status"]
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


class _Series:
    """Count, sum and per-bucket counts of one label set: plain ints, no lock.

    The sidecar is one event loop: nothing else writes these concurrently.
    """

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * (len(_BUCKETS) + 1)


class _RequestCollector:
    """``requests_total`` and ``request_duration_seconds`` rendered at scrape time.

    prometheus_client's Counter.inc and Histogram.observe each take a lock and
    walk the buckets in Python per call; at tens of thousands of requests a
    second that showed up in the profile, so the hot path only bumps ints.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.series: dict[tuple[str, str, str, int], _Series] = {}

    def collect(self) -> Iterator[Metric]:
        count = CounterMetricFamily(self.prefix + "requests", "Requests handled", labels=_LABELS)
        hist = HistogramMetricFamily(
            self.prefix + "request_duration_seconds",
            "Request latency as seen by this sidecar",
            labels=_LABELS,
        )
        for (direction, source, dest, status), s in list(self.series.items()):
            labels = [direction, source, dest, str(status)]
            count.add_metric(labels, s.count)
            acc = 0
            buckets = []
            for le, n in zip(_LE, s.buckets, strict=False):
                acc += n
                buckets.append((le, float(acc)))
            buckets.append(("+Inf", float(s.count)))
            hist.add_metric(labels, buckets, s.sum)
        yield count
        yield hist

    def describe(self) -> list[Metric]:
        return []


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        p = "natsmesh_sidecar_"
        self.requests = _RequestCollector(p)
        r.register(self.requests)
        self.inflight = Gauge(
            p + "inflight_requests", "Requests in flight", ["direction"], registry=r
        )
        self.retries = Counter(p + "retries", "Retried attempts", ["destination"], registry=r)
        self.circuit = Gauge(
            p + "circuit_state",
            "Circuit state per destination subject (0 closed, 1 open, 2 half-open)",
            ["destination"],
            registry=r,
        )
        self.events_published = Counter(
            p + "events_published", "Events acknowledged by JetStream", ["topic"], registry=r
        )
        self.events_delivered = Counter(
            p + "events_delivered", "Event deliveries to the app", ["topic", "result"], registry=r
        )
        self.events_dead = Counter(
            p + "events_dead_lettered",
            "Events sent to the dead-letter subject",
            ["topic"],
            registry=r,
        )
        self.nats_connected = Gauge(p + "nats_connected", "1 while connected to NATS", registry=r)
        self.nats_reconnects = Counter(p + "nats_reconnects", "NATS reconnections", registry=r)
        self.creds_renewals = Counter(
            p + "creds_renewals",
            "New creds taken up: a second connection opened, then the old one drained",
            registry=r,
        )
        self.nats_errors = Counter(
            p + "nats_async_errors", "Asynchronous NATS errors", ["kind"], registry=r
        )
        self.table_swaps = Counter(p + "table_updates", "Route tables applied", registry=r)
        self._sources: set[str] = set()
        self._destinations: set[str] = set()
        self.inflight_out = self.inflight.labels("outbound")
        self.inflight_in = self.inflight.labels("inbound")

    def observe(
        self, direction: str, source: str, destination: str, status: int, seconds: float
    ) -> None:
        series = self.requests.series
        key = (direction, source, destination, status)
        s = series.get(key)
        if s is None:
            # Only a new label set pays for the checks: known ones were admitted.
            source = self._admit(self._sources, source, MAX_SOURCES)
            destination = self._admit(self._destinations, destination, MAX_SERIES)
            if len(series) >= MAX_SERIES:
                destination = OTHER
            key = (direction, source, destination, status)
            s = series.get(key)
            if s is None:
                s = series[key] = _Series()
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
        return generate_latest(self.registry)


class AdminServer:
    """A tiny HTTP/1.0-style server: one request per connection, GET only."""

    def __init__(
        self, metrics: Metrics, healthy: Callable[[], bool], ready: Callable[[], bool]
    ) -> None:
        self.metrics = metrics
        self.healthy = healthy
        self.ready = ready
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
