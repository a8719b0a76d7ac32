"""A small OTLP/HTTP span exporter: JSON encoding, POST to ``<endpoint>/v1/traces``.

Imported only when ``NATSMESH_OTLP_ENDPOINT`` is set (by
:mod:`natsmesh_sidecar.observe.tracing`). The OpenTelemetry Python SDK would do
this too, but it brings its API, SDK, protobuf and exporter packages (and a
thread per batch processor) into a process whose whole budget is ~30 MB;
the part of OTLP a sidecar needs is one JSON document per batch
(opentelemetry-proto's ``ExportTraceServiceRequest`` in the proto3 JSON
mapping, which OTLP/HTTP accepts with ``Content-Type: application/json``).

What it promises the request path:

* :meth:`OtlpExporter.add` never blocks and never raises: a span is a tuple
  appended to a bounded deque; when the queue is full the span is dropped
  and counted (``natsmesh_sidecar_spans_dropped_total{reason="queue_full"}``).
* Export happens in one background task, a batch at a time, when a batch is
  full or every ``interval`` seconds, with a short timeout for the whole
  exchange. A batch that fails (collector down, slow, refusing) is dropped
  and counted; nothing is retried, so a dead collector costs one connection
  attempt per interval and no memory beyond the queue.
* The endpoint's path, query and credentials never reach a log line: only
  scheme, host and port do.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from urllib.parse import urlsplit

from natsmesh_sidecar.logthrottle import LogThrottle
from natsmesh_sidecar.observe.metrics import Metric, Registry

logger = logging.getLogger(__name__)

#: OTLP span kinds (opentelemetry-proto ``Span.SpanKind``).
SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5
#: ``Status.StatusCode.STATUS_CODE_ERROR``.
STATUS_ERROR = 2
SCOPE = "natsmesh-sidecar"

#: An attribute value: text, or a whole number (int64, sent as a string).
AttrValue = str | int
#: (trace id, span id, parent span id or "", kind, name, start ns, end ns,
#: attributes, error message or None). A tuple, not an object: the request
#: path makes one per sampled hop and the encoder reads it once.
Span = tuple[str, str, str, int, str, int, int, tuple[tuple[str, AttrValue], ...], str | None]


@dataclass(frozen=True)
class Endpoint:
    """Where batches go; ``safe`` is what may be logged."""

    host: str
    port: int
    tls: bool
    path: str
    hostport: str

    @property
    def safe(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.hostport}"

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """``http(s)://host[:port][/base]``; OTLP/HTTP appends ``/v1/traces`` to the base."""
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the OTLP endpoint must be an http:// or https:// URL with a host")
        if parts.username or parts.password or parts.query:
            # Either would end up in the request line or a log: say so up front.
            raise ValueError("the OTLP endpoint may not carry credentials or a query")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = parts.hostname
        hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        path = parts.path.rstrip("/") + "/v1/traces"
        return cls(host, port, tls, path, hostport)


#: A JSON string literal, quotes included (the json module's C encoder).
_quote = encode_basestring_ascii
#: Attribute key -> the text before its value (keys are this package's own).
_KEYS: dict[str, str] = {}


def _attributes(pairs: Iterable[tuple[str, AttrValue]]) -> str:
    """OTLP ``KeyValue``s as JSON text; int64 travels as a decimal string (proto3 JSON)."""
    out = []
    for k, v in pairs:
        head = _KEYS.get(k)
        if head is None:
            head = _KEYS[k] = f'{{"key":{_quote(k)},"value":'
        if v.__class__ is int:
            out.append(f'{head}{{"intValue":"{v}"}}}}')
        else:
            out.append(f'{head}{{"stringValue":{_quote(str(v))}}}}}')
    return ",".join(out)


def encode(resource: Sequence[tuple[str, AttrValue]], spans: Sequence[Span]) -> bytes:
    """One ``ExportTraceServiceRequest`` in OTLP's JSON encoding.

    Written as text, not through dicts and ``json.dumps``: that took 40 us
    per span, on the sidecar's one event loop, about a third of what a
    request costs it. Every string goes through the C encoder's quoting:
    names, paths and parent ids come from apps and callers. Trace and span
    ids are lower-case hex, as OTLP/JSON specifies (not the base64 of
    proto3's generic ``bytes`` mapping).
    """
    out = []
    for trace_id, span_id, parent, kind, name, start, end, attrs, error in spans:
        parent_part = f'"parentSpanId":{_quote(parent)},' if parent else ""
        status = (
            f',"status":{{"code":{STATUS_ERROR},"message":{_quote(error)}}}'
            if error is not None
            else ""
        )
        out.append(
            f'{{"traceId":{_quote(trace_id)},"spanId":{_quote(span_id)},{parent_part}'
            f'"name":{_quote(name)},"kind":{kind},'
            f'"startTimeUnixNano":"{start}","endTimeUnixNano":"{end}",'
            f'"attributes":[{_attributes(attrs)}]{status}}}'
        )
    return (
        f'{{"resourceSpans":[{{"resource":{{"attributes":[{_attributes(resource)}]}},'
        f'"scopeSpans":[{{"scope":{{"name":{_quote(SCOPE)}}},"spans":[{",".join(out)}]}}]}}]}}'
    ).encode()


class OtlpExporter:
    """Bounded queue + one export task; see the module docstring."""

    def __init__(
        self,
        endpoint: Endpoint,
        resource: Sequence[tuple[str, AttrValue]],
        registry: Registry,
        *,
        max_queue: int = 4096,
        batch: int = 512,
        interval: float = 1.0,
        timeout: float = 2.0,
    ) -> None:
        self.endpoint = endpoint
        self.resource = tuple(resource)
        self.max_queue = max_queue
        self.batch = batch
        self.interval = interval
        self.timeout = timeout
        self.queue: collections.deque[Span] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._ssl = ssl.create_default_context() if endpoint.tls else None
        self._log = LogThrottle(30.0)
        p = "natsmesh_sidecar_"
        self.exported = Metric(p + "spans_exported", "Spans the collector accepted", "counter")
        self.dropped = Metric(
            p + "spans_dropped",
            "Spans not exported: queue_full (the collector is slower than the "
            "traffic) or export_failed (the batch's POST failed)",
            "counter",
            ("reason",),
        )
        for family in (self.exported, self.dropped):
            registry.register(family)
        self._queue_full = self.dropped.labels("queue_full")
        self._failed = self.dropped.labels("export_failed")

    def add(self, span: Span) -> None:
        queue = self.queue
        if len(queue) >= self.max_queue:
            self._queue_full.inc()
            return
        queue.append(span)
        if len(queue) == self.batch and self._wake is not None:
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Export until ``stop`` is set; a batch when full or every interval."""
        wake = self._wake = asyncio.Event()
        logger.info("exporting spans to %s", self.endpoint.safe)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.interval)
            wake.clear()
            # What is queued now, in batches; spans arriving meanwhile wait
            # for the next wake (a full batch) or tick, so a trickle of
            # traffic is not sent a span at a time. A failed batch ends the
            # round: a dead collector is tried once per interval.
            left = len(self.queue)
            while left > 0 and await self.export_batch():
                left -= self.batch

    async def flush(self, within: float) -> None:
        """Export what is queued, giving up after ``within`` seconds (the drain)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.queue and loop.time() < deadline:
            await self.export_batch(max(0.05, min(self.timeout, deadline - loop.time())))

    async def export_batch(self, within: float | None = None) -> bool:
        """POST up to ``batch`` queued spans; True when the collector took them."""
        queue = self.queue
        spans = [queue.popleft() for _ in range(min(self.batch, len(queue)))]
        if not spans:
            return True
        try:
            status = await asyncio.wait_for(
                self._post(encode(self.resource, spans)), within or self.timeout
            )
        except (OSError, TimeoutError, ValueError, ssl.SSLError) as exc:
            self._failure(len(spans), f"{type(exc).__name__}: {exc}")
            return False
        if 200 <= status < 300:
            self.exported.inc(len(spans))
            return True
        self._failure(len(spans), f"HTTP {status}")
        return False

    def _failure(self, count: int, why: str) -> None:
        self._failed.inc(count)
        held = self._log.allow("export")
        if held is not None:
            more = f" ({held} more failed batches not logged)" if held else ""
            logger.warning(
                "span export to %s failed: %s; %d spans dropped%s",
                self.endpoint.safe,
                why,
                count,
                more,
            )

    async def _post(self, body: bytes) -> int:
        """One request on its own connection; the response's status code.

        A connection per batch (at most a few a second) keeps this free of
        keep-alive bookkeeping; the body of the answer is not read.
        """
        ep = self.endpoint
        reader, writer = await asyncio.open_connection(
            ep.host, ep.port, ssl=self._ssl, server_hostname=ep.host if ep.tls else None
        )
        try:
            writer.write(
                b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (ep.path.encode(), ep.hostport.encode(), len(body), body)
            )
            line = await reader.readline()
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
                raise ValueError("not an HTTP response")
            return int(parts[1])
        finally:
            writer.close()
