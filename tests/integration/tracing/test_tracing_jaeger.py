"""Each hop's span reaches a real Jaeger and the tree links across sidecars.

The shop on an operator-mode nats-server, three sidecars with tracing on
(gateway, orders, payments) exporting to a Jaeger built by hack/tools.sh.
The test plays the gateway's app: it calls orders through the gateway's
sidecar with a traceparent of its own; orders' app publishes
``order.created`` through its sidecar, passing on the traceparent it got
(what a W3C-aware app does); payments' app receives the event. Jaeger must
then hold one trace with the four spans, parented hop to hop:

    gateway  CLIENT   POST orders.shop        parent: the test's span
    orders   SERVER   POST                    parent: gateway's CLIENT
    orders   PRODUCER publish order.created   parent: orders' SERVER
    payments CONSUMER process order.created   parent: orders' PRODUCER
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from natsmesh_sidecar.app import Sidecar
from tests.fixtures.jaeger import Jaeger
from tests.fixtures.nats_operator import OperatorNats
from tests.integration.sidecar.jwt_harness import (
    NS,
    applied_shop,
    issue,
    wait_for,
    write_creds,
)
from tests.integration.sidecar.sidecar_harness import (
    AppReply,
    AppRequest,
    TestApp,
    request,
    settings,
)

pytestmark = pytest.mark.integration

CALLER_SPAN = "1111111111111111"


@dataclass
class TracedShop:
    gateway: Sidecar
    orders: Sidecar
    payments: Sidecar
    orders_app: TestApp
    payments_app: TestApp


@pytest.fixture
async def shop(
    nats_operator: OperatorNats, jaeger: Jaeger, tmp_path: Path
) -> AsyncIterator[TracedShop]:
    p, creds = await applied_shop(nats_operator, tmp_path)
    creds["payments"] = tmp_path / "payments.creds"
    write_creds(creds["payments"], issue(nats_operator, p, "payments").creds)
    orders_port: list[int] = []

    async def orders(req: AppRequest) -> AppReply:
        # The app hands its traceparent on, as any W3C-aware app does.
        tp = req.header("traceparent") or ""
        published = await request(
            orders_port[0],
            "POST",
            "/_events/order.created",
            host="orders",
            headers=[("traceparent", tp), ("content-type", "application/json")],
            body=b'{"order": 1}',
        )
        return AppReply(201 if published.status == 202 else 500, [], b"created")

    async def payments(req: AppRequest) -> AppReply:
        return AppReply(200, [], b"")

    orders_app = await TestApp(orders).start()
    payments_app = await TestApp(payments).start()
    traced = {"otlp_endpoint": jaeger.otlp_endpoint}
    started: list[Sidecar] = []
    try:
        for name, port in (
            ("orders", orders_app.port),
            ("payments", payments_app.port),
            ("gateway", 1),
        ):
            sidecar = Sidecar(
                settings(name, NS, nats_operator.url, port, creds_file=str(creds[name]), **traced)
            )
            started.append(sidecar)
            await sidecar.start()
        for sidecar in started:
            await sidecar.wait_ready()
        orders_port.append(started[0].outbound_port)
        yield TracedShop(started[2], started[0], started[1], orders_app, payments_app)
    finally:
        for sidecar in reversed(started):
            await sidecar.stop()
        await orders_app.stop()
        await payments_app.stop()


def tags(span: dict[str, Any]) -> dict[str, Any]:
    return {t["key"]: t["value"] for t in span["tags"]}


def parent(span: dict[str, Any]) -> str | None:
    refs = [r for r in span["references"] if r["refType"] == "CHILD_OF"]
    return refs[0]["spanID"] if refs else None


async def call(
    shop: TracedShop, trace_id: str, flags: str = "01", host: str = "orders", **kw: Any
) -> int:
    """The gateway app's call through its sidecar, under the test's own span."""
    kw.setdefault("body", b"{}")
    resp = await request(
        shop.gateway.outbound_port,
        kw.pop("method", "POST"),
        kw.pop("target", "/orders"),
        host=host,
        headers=[("traceparent", f"00-{trace_id}-{CALLER_SPAN}-{flags}")],
        **kw,
    )
    return resp.status


async def test_a_call_and_its_event_are_one_linked_trace_in_jaeger(
    shop: TracedShop, jaeger: Jaeger
) -> None:
    trace_id = os.urandom(16).hex()
    assert await call(shop, trace_id, target="/orders?card=4111111111111111") == 201
    await wait_for(lambda: shop.payments_app.requests, 10, "the event at payments")

    trace = await asyncio.to_thread(jaeger.trace, trace_id, 4)
    spans = trace["spans"]
    assert {s["traceID"] for s in spans} == {trace_id}
    service = {pid: p["serviceName"] for pid, p in trace["processes"].items()}
    by_name = {(service[s["processID"]], s["operationName"]): s for s in spans}
    assert set(by_name) == {
        ("gateway", "POST orders.shop"),
        ("orders", "POST"),
        ("orders", "publish order.created"),
        ("payments", "process order.created"),
    }
    client = by_name["gateway", "POST orders.shop"]
    server = by_name["orders", "POST"]
    publish = by_name["orders", "publish order.created"]
    deliver = by_name["payments", "process order.created"]
    assert parent(client) == CALLER_SPAN
    assert parent(server) == client["spanID"]
    assert parent(publish) == server["spanID"]
    assert parent(deliver) == publish["spanID"]

    # What the apps were handed is the span of their own hop.
    [order_call] = shop.orders_app.requests
    assert order_call.header("traceparent") == f"00-{trace_id}-{server['spanID']}-01"
    [event] = shop.payments_app.requests
    assert event.header("traceparent") == f"00-{trace_id}-{deliver['spanID']}-01"

    c, s, d = tags(client), tags(server), tags(deliver)
    assert c["span.kind"] == "client"
    assert s["span.kind"] == "server"
    assert tags(publish)["span.kind"] == "producer"
    assert d["span.kind"] == "consumer"
    assert c["http.request.method"] == "POST"
    assert c["url.path"] == "/orders"  # the query string (a card number) stays out
    assert not any("4111" in str(v) for span in spans for v in tags(span).values())
    assert c["peer.service"] == "orders.shop"
    assert c["http.response.status_code"] == 201
    assert s["peer.service"] == "gateway.shop"
    assert s["natsmesh.version"] == "v1"
    assert d["messaging.destination.name"] == "order.created"
    assert d["natsmesh.result"] == "delivered"
    processes = {p["serviceName"]: tags(p) for p in trace["processes"].values()}
    assert processes["orders"]["service.namespace"] == NS
    assert processes["orders"]["service.version"] == "v1"
    assert not any(tags(x).get("error") for x in spans)


async def test_a_refused_call_is_an_error_span_and_an_unsampled_trace_is_not_exported(
    shop: TracedShop, jaeger: Jaeger
) -> None:
    refused = os.urandom(16).hex()
    # The gateway may not call payments.
    assert await call(shop, refused, host="payments", method="GET", target="/", body=b"") == 403
    unsampled = os.urandom(16).hex()
    assert await call(shop, unsampled, flags="00") == 201
    await wait_for(lambda: shop.payments_app.requests, 10, "the event at payments")
    # The flag travelled with the call and its event: nobody sampled it.
    assert (shop.payments_app.requests[0].header("traceparent") or "").endswith("-00")

    [span] = (await asyncio.to_thread(jaeger.trace, refused, 1))["spans"]
    t = tags(span)
    assert t["error"] is True
    assert t["error.type"] == "forbidden"
    assert t["otel.status_code"] == "ERROR"
    # Everything above was exported within a second; the sampled-off one never is.
    for sidecar in (shop.gateway, shop.orders, shop.payments):
        assert sidecar.tracer is not None
        await sidecar.tracer.exporter.flush(2.0)
    assert jaeger.get(f"/api/traces/{unsampled}") is None
