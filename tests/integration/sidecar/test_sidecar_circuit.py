"""The circuit breaker counts the callee's failed requests, nothing else.

Real sidecars with real user JWTs on an operator-mode nats-server; the route
(retries, circuit breaker) comes from a NatsRoute compiled into orders'
Target key, as the operator writes it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from natsmesh_operator.wiring.routes import RouteDestination, RouteRule
from natsmesh_sidecar.config import CircuitBreaker, Retries
from natsmesh_sidecar.policy import resilience
from tests.fixtures.nats_operator import OperatorNats
from tests.integration.sidecar.jwt_harness import CutProxy, Load, RoutedShop, metric, wait_for
from tests.integration.sidecar.sidecar_harness import AppReply, AppRequest, TestApp, echo, request

pytestmark = pytest.mark.integration

RULE = RouteRule(
    destinations=(RouteDestination("v1"),),
    name="orders",
    timeout_ms=3000,
    retries=Retries(
        attempts=3,
        retry_on=("noResponders", "timeout", "5xx"),
        backoff_base_ms=5,
        backoff_max_ms=20,
    ),
    circuit_breaker=CircuitBreaker(consecutive_failures=3, open_ms=10_000),
)


@pytest.fixture
async def shop(nats_operator: OperatorNats, tmp_path: Path) -> AsyncIterator[RoutedShop]:
    async with RoutedShop.running(nats_operator, tmp_path, RULE) as s:
        yield s


def breakers(sidecar: object) -> dict[str, tuple[int, int]]:
    """Subject -> (state, failures) of every circuit the sidecar keeps."""
    return {k: (b.state, b.failures) for k, b in sidecar.breakers.items()}  # type: ignore[attr-defined]


async def test_a_retry_that_gets_through_is_a_success_and_a_failed_request_counts_once(
    shop: RoutedShop,
) -> None:
    seen: set[str] = set()

    async def fails_first_attempt(req: AppRequest) -> AppReply:
        rid = req.header("x-request-id") or ""
        if req.path.startswith("/ok") and rid not in seen:
            seen.add(rid)  # every request's first attempt fails; its retry succeeds
            return AppReply(503, [], b"warming up")
        return await echo(req)

    app = await TestApp(fails_first_attempt).start()
    try:
        orders = await shop.orders(app.port)
        await orders.wait_ready()
        gateway = await shop.gateway()
        # Eight clients at once: the first attempts of different requests
        # fail back to back, which per-attempt counting took for an outage.
        load = Load(gateway.outbound_port, clients=8)
        load.start()
        await wait_for(lambda: len(load.results) > 200, 20, "200 calls")
        await load.finish()
        assert load.statuses() == {200: len(load.results)}, load.statuses()
        retried = metric(gateway, "natsmesh_sidecar_retries_total", destination="orders.shop")
        assert retried >= len(load.results)
        ((state, failures),) = breakers(gateway).values()
        assert (state, failures) == (resilience.CLOSED, 0)

        # A request whose four attempts all fail is one failure, not four.
        r = await request(gateway.outbound_port, "GET", "/status/503", host="orders")
        assert r.status == 503
        assert breakers(gateway) == {next(iter(breakers(gateway))): (resilience.CLOSED, 1)}
        for _ in range(2):
            await request(gateway.outbound_port, "GET", "/status/500", host="orders")
        ((state, failures),) = breakers(gateway).values()
        assert (state, failures) == (resilience.OPEN, 3)
        r = await request(gateway.outbound_port, "GET", "/ok", host="orders")
        assert r.status == 503
        assert r.json()["error"] == "circuit_open"
    finally:
        await app.stop()


async def test_the_callers_own_connection_dropping_opens_no_circuit(
    shop: RoutedShop, nats_operator: OperatorNats
) -> None:
    app = await TestApp().start()
    proxy = await CutProxy(nats_operator.server.port).start()
    try:
        orders = await shop.orders(app.port)
        await orders.wait_ready()
        gateway = await shop.gateway(nats_url=proxy.url)
        assert (await request(gateway.outbound_port, "GET", "/ok", host="orders")).status == 200
        load = Load(gateway.outbound_port, clients=8)
        load.start()
        await asyncio.sleep(0.5)
        for _ in range(3):
            # The gateway's connection drops (calls in flight fail at once)
            # and stays down for a while (calls fail fast): each is a 503
            # nats_unavailable, and none of it is orders' doing.
            await proxy.cut(0.4)
            await wait_for(gateway.ready, 10, "the gateway reconnected")
            await asyncio.sleep(0.4)
        mark = len(load.results)
        await wait_for(lambda: len(load.results) > mark + 50, 15, "calls after the last cut")
        await load.finish()
        statuses = load.statuses()
        errors = {json.loads(b)["error"] for _, s, b in load.results if s != 200}
        assert set(statuses) == {200, 503}, statuses
        assert errors == {"nats_unavailable"}, errors
        assert metric(gateway, "natsmesh_sidecar_nats_reconnects_total") >= 3
        ((state, failures),) = breakers(gateway).values()
        assert (state, failures) == (resilience.CLOSED, 0)
        # Reconnected, every call gets through: nothing is left open.
        assert all(s == 200 for _, s, _ in load.results[mark:])
    finally:
        await proxy.close()
        await app.stop()


async def test_an_app_cannot_mark_its_502_undelivered_to_get_a_post_repeated(
    shop: RoutedShop,
) -> None:
    """Only the callee's sidecar may say "nothing reached the app" (then the
    caller retries even a POST elsewhere); the app saying it is not believed."""

    async def liar(req: AppRequest) -> AppReply:
        return AppReply(502, [("Nm-Undelivered", "1"), ("nm-undelivered", "1")], b"lie")

    app = await TestApp(liar).start()
    try:
        orders = await shop.orders(app.port)
        await orders.wait_ready()
        gateway = await shop.gateway()
        r = await request(gateway.outbound_port, "POST", "/pay", host="orders", body=b"{}")
        assert r.status == 502
        assert r.body == b"lie"
        assert [q.path for q in app.requests] == ["/pay"]  # not repeated
        ((state, failures),) = breakers(gateway).values()
        assert (state, failures) == (resilience.CLOSED, 1)  # and counted
    finally:
        await app.stop()
