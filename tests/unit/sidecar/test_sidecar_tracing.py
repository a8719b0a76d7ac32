"""Spans and their OTLP/JSON encoding: ids from the traceparent, parents,
attributes, error status, sampling, the bounded queue, export to a loopback
collector. (That nothing of tracing is loaded while it is off:
test_sidecar_imports.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from natsmesh_sidecar import codec
from natsmesh_sidecar.observe import otlp, tracing
from natsmesh_sidecar.observe.metrics import Registry
from tests.fixtures.nats_server import free_port

pytestmark = pytest.mark.unit

APP_TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE = "0af7651916cd43dd8448eb211c80319c"
RESOURCE = (("service.name", "orders"), ("service.namespace", "shop"))


def exporter(**kw: object) -> otlp.OtlpExporter:
    return otlp.OtlpExporter(
        otlp.Endpoint.parse("http://127.0.0.1:4318"),
        RESOURCE,
        Registry(),
        **kw,  # type: ignore[arg-type]
    )


def tracer(ratio: float = 1.0, rand: float = 0.5, **kw: object) -> tracing.Tracer:
    return tracing.Tracer(exporter(**kw), ratio=ratio, rand=lambda: rand)


def decoded(t: tracing.Tracer) -> list[dict[str, object]]:
    """The queued spans as the collector would read them."""
    doc = json.loads(otlp.encode(t.exporter.resource, list(t.exporter.queue)))
    [rs] = doc["resourceSpans"]
    [ss] = rs["scopeSpans"]
    spans: list[dict[str, object]] = ss["spans"]
    return spans


def attrs(span: dict[str, object]) -> dict[str, str]:
    out = {}
    for a in span["attributes"]:  # type: ignore[attr-defined]
        (v,) = a["value"].values()
        out[a["key"]] = v
    return out


def outbound(t: tracing.Tracer, own: str | None, incoming: str | None, **kw: object) -> None:
    """One outbound span; what a test does not name is a plain 200 GET."""
    call: dict[str, object] = {
        "method": "GET",
        "path": "/",
        "destination": "orders.shop",
        "route": "-",
        "status": 200,
        "error": "",
        "attempts": 1,
        "request_id": "r",
    }
    call.update(kw)
    t.outbound(own, incoming, float(str(call.pop("seconds", 0.0))), **call)  # type: ignore[arg-type]


def test_encoding_is_otlp_json_with_hex_ids_and_string_int64() -> None:
    body = otlp.encode(
        RESOURCE,
        [
            (TRACE, "b7ad6b7169203331", "", otlp.CLIENT, "GET x", 10, 25, (("n", 3),), None),
            (TRACE, "00f067aa0ba902b7", "b7ad6b7169203331", otlp.SERVER, "GET", 12, 20, (), "boom"),
        ],
    )
    doc = json.loads(body)
    [rs] = doc["resourceSpans"]
    assert rs["resource"]["attributes"] == [
        {"key": "service.name", "value": {"stringValue": "orders"}},
        {"key": "service.namespace", "value": {"stringValue": "shop"}},
    ]
    [ss] = rs["scopeSpans"]
    assert ss["scope"] == {"name": "natsmesh-sidecar"}
    client, server = ss["spans"]
    assert client == {
        "traceId": TRACE,
        "spanId": "b7ad6b7169203331",
        "name": "GET x",
        "kind": 3,
        "startTimeUnixNano": "10",
        "endTimeUnixNano": "25",
        "attributes": [{"key": "n", "value": {"intValue": "3"}}],
    }
    assert server["parentSpanId"] == "b7ad6b7169203331"
    assert server["status"] == {"code": 2, "message": "boom"}
    assert "parentSpanId" not in client
    assert "status" not in client


def test_outbound_span_is_the_traceparent_sent_on_child_of_the_apps() -> None:
    t = tracer()
    sent = t.next_traceparent(APP_TP)
    outbound(t, sent, APP_TP, seconds=0.004, path="/orders/7")
    [span] = decoded(t)
    assert span["traceId"] == TRACE == sent[3:35]
    assert span["spanId"] == sent[36:52] != "b7ad6b7169203331"
    assert span["parentSpanId"] == "b7ad6b7169203331"
    assert span["kind"] == otlp.CLIENT
    assert span["name"] == "GET orders.shop"
    assert "status" not in span
    a = attrs(span)
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/orders/7"
    assert a["peer.service"] == "orders.shop"
    assert a["http.response.status_code"] == "200"
    start, end = int(str(span["startTimeUnixNano"])), int(str(span["endTimeUnixNano"]))
    assert end - start == 4_000_000


#: An inbound span's keywords for a plain 200 GET.
INBOUND: dict[str, object] = {
    "method": "GET",
    "path": "/",
    "caller": "-",
    "status": 200,
    "error": "",
    "version": "v1",
    "request_id": "r",
}


def test_inbound_span_hands_the_app_its_own_id_and_parents_on_the_caller() -> None:
    t = tracer()
    caller = t.next_traceparent(APP_TP)
    headers = {codec.TRACEPARENT: caller, codec.H_SOURCE: "gateway.shop"}
    t.adopt(headers)
    for_app = headers[codec.TRACEPARENT]
    assert for_app[3:35] == TRACE
    assert for_app[36:52] != caller[36:52]
    # Never rendered to the app: an Nm- header.
    assert codec.nats_to_http(headers) == [(codec.TRACEPARENT, for_app)]
    t.inbound(headers, 0.002, **{**INBOUND, "caller": "gateway.shop", "status": 503})  # type: ignore[arg-type]
    [span] = decoded(t)
    assert span["spanId"] == for_app[36:52]
    assert span["parentSpanId"] == caller[36:52]
    assert span["kind"] == otlp.SERVER
    assert span["status"] == {"code": 2, "message": "HTTP 503"}
    assert attrs(span)["peer.service"] == "gateway.shop"


def test_a_copy_of_the_private_header_in_the_message_is_overwritten() -> None:
    t = tracer()
    headers = {tracing.CALLER_TRACEPARENT: APP_TP}
    t.adopt(headers)
    t.inbound(headers, 0.0, **INBOUND)  # type: ignore[arg-type]
    [span] = decoded(t)
    assert "parentSpanId" not in span  # a new trace: the message named no traceparent
    assert span["traceId"] != TRACE


def test_mesh_errors_and_4xx_refusals_are_errors_and_publish_is_a_producer() -> None:
    t = tracer()
    outbound(t, None, None, destination="nope.shop", status=404, error="unknown_service")
    sent = t.next_traceparent(None)
    outbound(t, sent, None, method="POST", path="/_events/order.created", destination="_events")
    refused, publish = decoded(t)
    assert refused["status"] == {"code": 2, "message": "unknown_service (404)"}
    assert attrs(refused)["error.type"] == "unknown_service"
    assert publish["kind"] == otlp.PRODUCER
    assert publish["name"] == "publish order.created"
    assert attrs(publish)["messaging.destination.name"] == "order.created"
    assert "parentSpanId" not in publish


def test_delivery_span_is_a_consumer_child_of_the_publish() -> None:
    t = tracer()
    published = t.next_traceparent(APP_TP)
    own = t.next_traceparent(published)
    for result, error in (("delivered", None), ("retry", "retry (app answered 500)")):
        t.delivery(
            own,
            published,
            0.001,
            topic="order.created",
            publisher="orders.shop",
            path="/events/order-created",
            seq=4,
            attempt=1,
            status=200 if error is None else 500,
            result=result,
            request_id="r",
        )
    ok, failed = decoded(t)
    assert ok["kind"] == otlp.CONSUMER
    assert ok["name"] == "process order.created"
    assert ok["parentSpanId"] == published[36:52]
    assert "status" not in ok
    assert failed["status"] == {"code": 2, "message": "retry (app answered 500)"}
    assert attrs(ok)["messaging.message.id"] == "4"


def test_sampling_is_parent_based_and_the_ratio_applies_to_new_traces_only() -> None:
    never = tracer(ratio=0.1, rand=0.5)
    root = never.next_traceparent(None)
    assert root.endswith("-00")
    assert never.next_traceparent(APP_TP).endswith("-01")  # the parent's flag wins
    unsampled_parent = APP_TP[:-2] + "00"
    assert tracer().next_traceparent(unsampled_parent).endswith("-00")
    always = tracer(ratio=0.1, rand=0.05)
    assert always.next_traceparent(None).endswith("-01")
    # An unsampled hop records nothing, its children neither.
    outbound(never, root, None)
    assert list(never.exporter.queue) == []


def test_a_full_queue_drops_and_counts_without_blocking() -> None:
    ex = exporter(max_queue=3)
    span = (TRACE, "b7ad6b7169203331", "", otlp.CLIENT, "x", 1, 2, (), None)
    for _ in range(5):
        ex.add(span)
    assert len(ex.queue) == 3
    assert ex.dropped.labels("queue_full").get() == 2.0


@pytest.mark.parametrize(
    ("url", "path", "safe"),
    [
        ("http://jaeger:4318", "/v1/traces", "http://jaeger:4318"),
        ("https://otel.example/base/", "/base/v1/traces", "https://otel.example:443"),
        ("http://[::1]:4318", "/v1/traces", "http://[::1]:4318"),
    ],
)
def test_endpoint_path_and_what_may_be_logged(url: str, path: str, safe: str) -> None:
    ep = otlp.Endpoint.parse(url)
    assert (ep.path, ep.safe) == (path, safe)


@pytest.mark.parametrize(
    "url", ["jaeger:4318", "grpc://jaeger:4317", "http://u:secret@jaeger:4318", "http://j/?k=v"]
)
def test_endpoint_refuses_what_it_cannot_use_or_would_leak(url: str) -> None:
    with pytest.raises(ValueError, match="OTLP endpoint") as err:
        otlp.Endpoint.parse(url)
    assert "secret" not in str(err.value)


class _Collector:
    """A loopback HTTP server that answers every request with ``status``
    (after ``delay``) and keeps the bodies."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.status = status
        self.delay = delay
        self.requests: list[tuple[bytes, bytes]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        self.requests.append((head, await reader.readexactly(length)))
        await asyncio.sleep(self.delay)
        writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % self.status)
        await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


def _loopback_exporter(port: int, **kw: object) -> otlp.OtlpExporter:
    return otlp.OtlpExporter(
        otlp.Endpoint.parse(f"http://127.0.0.1:{port}/otel"),
        RESOURCE,
        Registry(),
        **kw,  # type: ignore[arg-type]
    )


SPAN = (TRACE, "b7ad6b7169203331", "", otlp.CLIENT, "x", 1, 2, (), None)


async def test_batches_are_posted_when_full_and_on_the_interval() -> None:
    collector = _Collector()
    ex = _loopback_exporter(await collector.start(), batch=3, interval=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(ex.run(stop))
    try:
        await asyncio.sleep(0)
        for _ in range(3):
            ex.add(SPAN)
        for _ in range(100):
            if collector.requests:
                break
            await asyncio.sleep(0.01)
        head, body = collector.requests[0]
        assert head.startswith(b"POST /otel/v1/traces HTTP/1.1\r\n")
        assert b"content-type: application/json" in head.lower()
        assert len(json.loads(body)["resourceSpans"][0]["scopeSpans"][0]["spans"]) == 3
        ex.add(SPAN)  # one span: goes on the interval
        # The collector holds the request before the exporter has read the
        # answer and counted the spans: wait for both.
        for _ in range(200):
            if len(collector.requests) == 2 and ex.exported.labels().get() == 4.0:
                break
            await asyncio.sleep(0.01)
        assert len(collector.requests) == 2
        assert ex.exported.labels().get() == 4.0
    finally:
        stop.set()
        await task
        await collector.stop()


async def test_a_refusing_or_slow_collector_costs_the_batch_not_the_caller() -> None:
    refusing = _Collector(status=500)
    slow = _Collector(delay=5.0)
    for collector, timeout in ((refusing, 2.0), (slow, 0.2)):
        ex = _loopback_exporter(await collector.start(), timeout=timeout)
        ex.add(SPAN)
        ex.add(SPAN)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert not await ex.export_batch()
        assert loop.time() - started < 1.0
        assert ex.dropped.labels("export_failed").get() == 2.0
        assert ex.exported.labels().get() == 0.0
        await collector.stop()
    # Nobody listening: refused at once, counted the same way.
    ex = _loopback_exporter(free_port())
    ex.add(SPAN)
    assert not await ex.export_batch()
    assert ex.dropped.labels("export_failed").get() == 1.0


def test_strings_from_apps_and_callers_stay_valid_json() -> None:
    odd = 'GET "/a\\b"\n\u00e9\u2028'
    body = otlp.encode(
        (("service.name", odd),),
        [(TRACE, "b7ad6b7169203331", 'x"y', otlp.SERVER, odd, 1, 2, (("url.path", odd),), odd)],
    )
    [span] = json.loads(body)["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert span["name"] == odd
    assert span["parentSpanId"] == 'x"y'
    assert span["attributes"] == [{"key": "url.path", "value": {"stringValue": odd}}]
    assert span["status"]["message"] == odd


def test_a_sidecar_with_an_unusable_endpoint_refuses_to_start_without_echoing_it() -> None:
    env = {
        **os.environ,
        "NATSMESH_SERVICE": "a",
        "NATSMESH_NAMESPACE": "b",
        "NATSMESH_OTLP_ENDPOINT": "http://user:s3cret@collector:4318",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "natsmesh_sidecar"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "OTLP endpoint" in proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout


def test_what_callers_choose_is_clipped_before_it_is_queued() -> None:
    # A caller picks Nm-Target, Nm-Method and the request id (up to NATS's
    # max_payload, 1 MB); an app its URL (64 KB). With the collector slow or
    # down the queue holds 4096 spans: unclipped, gigabytes in a 30 MB sidecar.
    t = tracer()
    big = "x" * 100_000
    headers: dict[str, str] = {}
    t.adopt(headers)
    t.inbound(headers, 0.0, **{**INBOUND, "method": big, "path": "/" + big, "request_id": big})  # type: ignore[arg-type]
    outbound(t, None, None, method=big, path="/" + big, request_id=big)
    queued = list(t.exporter.queue)
    assert len(queued) == 2
    for span in queued:
        name, attributes = span[4], span[7]
        assert len(name) <= tracing.MAX_TEXT + len(" orders.shop")  # the method, clipped
        assert all(len(v) <= tracing.MAX_TEXT for _, v in attributes if isinstance(v, str))
    [inbound, _] = decoded(t)
    assert attrs(inbound)["url.path"] == ("/" + big)[: tracing.MAX_TEXT]
    assert attrs(inbound)["http.response.status_code"] == "200"
