"""Spans of each hop, linked by the W3C ``traceparent`` the mesh already propagates.

Loaded only when ``NATSMESH_OTLP_ENDPOINT`` is set: the sidecar's handlers
hold ``tracer = None`` otherwise and pay one ``is None`` test per request.

Every hop the sidecar handles is one span, and its span id is the one in
the ``traceparent`` that hop hands on, so the tree links across sidecars
without any other state:

* outbound call (CLIENT): the id in the traceparent sent to the callee;
  parent = the traceparent the app sent, if any;
* inbound call (SERVER): a new id, which the app receives as its
  traceparent (its own outbound calls become children of this span);
  parent = the caller's outbound span;
* event publish (PRODUCER): the id in the traceparent stored with the
  event; parent = the app's traceparent;
* event delivery (CONSUMER): a new id, handed to the app; parent = the
  publish span.

With tracing off nothing is rewritten: the app gets the caller's
traceparent as before.

Sampling is parent based: a traceparent's sampled flag decides for every
hop under it; a trace that starts here (no valid traceparent) is sampled
with probability ``ratio``, and the flag written into the traceparent tells
the next hops.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence

from natsmesh_sidecar import codec
from natsmesh_sidecar.observe.metrics import Registry
from natsmesh_sidecar.observe.otlp import (
    CLIENT,
    CONSUMER,
    PRODUCER,
    SERVER,
    AttrValue,
    Endpoint,
    OtlpExporter,
)

logger = logging.getLogger(__name__)

#: Where the inbound handler keeps, inside the message's own header dict,
#: the traceparent the caller sent while the app gets the inbound span's.
#: An ``Nm-`` name: never rendered to the app.
CALLER_TRACEPARENT = "Nm-Caller-Traceparent"
#: The longest method, path and request id a span keeps. Callers choose all
#: three (as large as NATS's max_payload), apps their URL (64 KB); the queue
#: holds up to 4096 spans while the collector is slow or down.
MAX_TEXT = 512


def sampled(traceparent: str) -> bool:
    """The sampled bit of a traceparent made by :func:`codec.next_traceparent`."""
    return traceparent[-1] in "13579bdf"


def parent_id(incoming: str | None, own: str) -> str:
    """The span id ``own`` continues from ``incoming``, or "" when it starts a trace."""
    if incoming is not None and incoming[3:35] == own[3:35] and len(incoming) >= 52:
        return incoming[36:52]
    return ""


class Tracer:
    """Makes the traceparents of traced hops and records their spans."""

    def __init__(
        self,
        exporter: OtlpExporter,
        *,
        ratio: float = 1.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.exporter = exporter
        self.ratio = ratio
        self._rand = rand

    @classmethod
    def create(
        cls,
        endpoint: str,
        *,
        service: str,
        namespace: str,
        version: str,
        instance: str,
        ratio: float,
        registry: Registry,
    ) -> Tracer:
        from natsmesh_sidecar import __version__

        resource: Sequence[tuple[str, AttrValue]] = (
            ("service.name", service),
            ("service.namespace", namespace),
            ("service.version", version),
            ("service.instance.id", instance),
            ("k8s.namespace.name", namespace),
            ("telemetry.sdk.name", "natsmesh-sidecar"),
            ("telemetry.sdk.version", __version__),
        )
        exporter = OtlpExporter(Endpoint.parse(endpoint), resource, registry)
        return cls(exporter, ratio=ratio)

    def next_traceparent(self, incoming: str | None) -> str:
        """:func:`codec.next_traceparent`, with the sampling decision for a new trace."""
        tp = codec.next_traceparent(incoming)
        if self.ratio < 1.0 and not parent_id(incoming, tp) and self._rand() >= self.ratio:
            return tp[:-2] + "00"
        return tp

    def _span(
        self,
        kind: int,
        name: str,
        own: str,
        incoming: str | None,
        seconds: float,
        attrs: tuple[tuple[str, AttrValue], ...],
        error: str | None,
    ) -> None:
        if not sampled(own):
            return
        end = time.time_ns()
        self.exporter.add(
            (
                own[3:35],
                own[36:52],
                parent_id(incoming, own),
                kind,
                name,
                end - int(seconds * 1e9),
                end,
                attrs,
                error,
            )
        )

    # -- one method per kind of hop: the attributes each carries ------------------

    def outbound(
        self,
        own: str | None,
        incoming: str | None,
        seconds: float,
        *,
        method: str,
        path: str,
        destination: str,
        route: str,
        status: int,
        error: str,
        attempts: int,
        request_id: str,
    ) -> None:
        """An app's call through the outbound listener (or its event publish)."""
        # Slices: a short string comes back as it is, for ~50 ns each.
        method, path, request_id = method[:MAX_TEXT], path[:MAX_TEXT], request_id[:MAX_TEXT]
        if own is None:
            # Refused before it was routed (unknown service, forbidden):
            # still the app's call, a span of its own.
            own = self.next_traceparent(incoming)
        attrs: tuple[tuple[str, AttrValue], ...]
        if destination == "_events":
            topic = path[len("/_events/") :]
            kind, name = PRODUCER, f"publish {topic}"
            attrs = (
                ("messaging.system", "nats"),
                ("messaging.operation.type", "publish"),
                ("messaging.destination.name", topic),
                ("http.response.status_code", status),
                ("natsmesh.request_id", request_id),
            )
        else:
            kind, name = CLIENT, f"{method} {destination}"
            attrs = (
                ("http.request.method", method),
                ("url.path", path),
                ("peer.service", destination),
                ("server.address", destination),
                ("http.response.status_code", status),
                ("natsmesh.route", route),
                ("natsmesh.attempts", attempts),
                ("natsmesh.request_id", request_id),
            )
        if error:
            attrs += (("error.type", error),)
        self._span(kind, name, own, incoming, seconds, attrs, _error(status, error))

    def adopt(self, headers: dict[str, str]) -> None:
        """Inbound, as a message arrives: the app will get this hop's
        traceparent; the caller's is kept aside (under an ``Nm-`` name, so a
        copy the message itself carried is overwritten) for the span."""
        incoming = headers.get(codec.TRACEPARENT)
        headers[CALLER_TRACEPARENT] = incoming or ""
        headers[codec.TRACEPARENT] = self.next_traceparent(incoming)

    def inbound(
        self,
        headers: dict[str, str],
        seconds: float,
        *,
        method: str,
        path: str,
        caller: str,
        status: int,
        error: str,
        version: str,
        request_id: str,
    ) -> None:
        """A caller's request served by the app behind this sidecar (after :meth:`adopt`)."""
        method, path, request_id = method[:MAX_TEXT], path[:MAX_TEXT], request_id[:MAX_TEXT]
        incoming = headers.get(CALLER_TRACEPARENT) or None
        own = headers.get(codec.TRACEPARENT)
        if own is None or CALLER_TRACEPARENT not in headers:
            own = self.next_traceparent(incoming)
        attrs: tuple[tuple[str, AttrValue], ...] = (
            ("http.request.method", method),
            ("url.path", path),
            ("peer.service", caller),
            ("http.response.status_code", status),
            ("natsmesh.version", version),
            ("natsmesh.request_id", request_id),
        )
        if error:
            attrs += (("error.type", error),)
        self._span(SERVER, method, own, incoming, seconds, attrs, _error(status, error))

    def delivery(
        self,
        own: str,
        incoming: str | None,
        seconds: float,
        *,
        topic: str,
        publisher: str,
        path: str,
        seq: int,
        attempt: int,
        status: int,
        result: str,
        request_id: str,
    ) -> None:
        """An event handed to the app (or skipped as a duplicate)."""
        request_id = request_id[:MAX_TEXT]  # the publisher's
        attrs: tuple[tuple[str, AttrValue], ...] = (
            ("messaging.system", "nats"),
            ("messaging.operation.type", "process"),
            ("messaging.destination.name", topic),
            ("messaging.message.id", seq),
            ("messaging.delivery.attempt", attempt),
            ("peer.service", publisher),
            ("url.path", path),
            ("http.response.status_code", status),
            ("natsmesh.result", result),
            ("natsmesh.request_id", request_id),
        )
        ok = result in ("delivered", "duplicate")
        error = None if ok else f"{result} (app answered {status})" if status else result
        self._span(CONSUMER, f"process {topic}", own, incoming, seconds, attrs, error)


def _error(status: int, error: str) -> str | None:
    """A span's error message: 5xx, or any error code the mesh set (a refused
    call, a fault, a timeout); None when it went well."""
    if error:
        return f"{error} ({status})"
    if status >= 500 or status == 0:
        return f"HTTP {status}"
    return None
