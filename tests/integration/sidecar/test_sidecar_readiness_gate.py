"""Readiness-aware membership: an app gets mesh traffic only while it can serve.

Real sidecars with real user JWTs on an operator-mode nats-server, two
replicas of orders where the test needs them, and a steady load through the
gateway. The route retries no responders (what a caller sees while a
one-replica service has nobody joined).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from natsmesh_operator.wiring.routes import RouteDestination, RouteRule
from natsmesh_sidecar.app import Sidecar
from natsmesh_sidecar.config import CircuitBreaker, Retries
from natsmesh_sidecar.policy import resilience
from tests.fixtures.nats_operator import OperatorNats
from tests.fixtures.nats_server import free_port
from tests.integration.sidecar.jwt_harness import Load, RoutedShop, wait_for
from tests.integration.sidecar.sidecar_harness import TestApp, request

pytestmark = pytest.mark.integration

#: Quick checks, so the tests' windows stay short.
CHECKS = {"ready_period_seconds": 0.25, "ready_failure_threshold": 2}

RULE = RouteRule(
    destinations=(RouteDestination("v1"),),
    name="orders",
    timeout_ms=5000,
    retries=Retries(attempts=6, retry_on=("noResponders",), backoff_base_ms=50, backoff_max_ms=400),
    circuit_breaker=CircuitBreaker(consecutive_failures=3, open_ms=10_000),
)


@pytest.fixture
async def shop(nats_operator: OperatorNats, tmp_path: Path) -> AsyncIterator[RoutedShop]:
    async with RoutedShop.running(nats_operator, tmp_path, RULE) as s:
        yield s


async def admin_ready(sidecar: Sidecar) -> int:
    """What the pod's readinessProbe gets from the sidecar's admin port."""
    return (await request(sidecar.admin_port, "GET", "/readyz")).status


def failures(load: Load, since: float = 0.0) -> list[tuple[int, str]]:
    return [
        (s, json.loads(b).get("error", "") if s >= 400 and b.startswith(b"{") else b.decode())
        for t, s, b in load.results
        if s != 200 and t >= since
    ]


async def test_a_late_app_gets_no_request_before_it_listens(shop: RoutedShop) -> None:
    """Replica A serves; replica B's sidecar starts 2 s before its app listens.
    No request reaches B (nor fails) until its app is up; then B shares the load."""
    app_a = await TestApp().start()
    app_b = TestApp()
    b_port = free_port()
    try:
        a = await shop.orders(app_a.port, **CHECKS)
        await a.wait_ready()
        gateway = await shop.gateway()
        load = Load(gateway.outbound_port)
        load.start()
        await asyncio.sleep(0.3)
        b = await shop.orders(b_port, **CHECKS)
        await asyncio.sleep(2.0)
        # Connected to NATS, but not in the queue group and not ready.
        assert b.nc is not None
        assert b.nc.is_connected
        assert not b.joined
        assert b.serving == {}
        assert await admin_ready(b) == 503
        assert b.inbound.served == 0
        await app_b.start(b_port)
        await wait_for(b.ready, 3, "B joining once its app listens")
        assert await admin_ready(b) == 200
        await wait_for(lambda: len(app_b.requests) > 20, 15, "B taking its share")
        await load.finish()
        assert failures(load) == []
        assert len(app_a.requests) > 20
    finally:
        await app_b.stop()
        await app_a.stop()


async def test_one_late_replica_callers_see_only_retried_no_responders(shop: RoutedShop) -> None:
    """The only replica's app listens 2 s after its sidecar: callers' requests
    wait in the route's no-responders retries (or get a 503 no_responders
    once those run out), never a 502, and all succeed once it joins."""
    app = TestApp()
    port = free_port()
    try:
        gateway = await shop.gateway()
        load = Load(gateway.outbound_port)
        orders = await shop.orders(port, **CHECKS)
        load.start()
        await asyncio.sleep(2.0)
        assert not orders.joined
        await app.start(port)
        await wait_for(orders.ready, 3, "orders joining")
        joined_at = time.monotonic()
        await wait_for(lambda: len(app.requests) > 50, 15, "orders serving")
        await load.finish()
        bad = failures(load)
        assert set(bad) <= {(503, "no_responders")}, bad
        assert failures(load, since=joined_at + 0.1) == []
        # Nobody home is not the callee failing: the circuit stayed closed.
        assert all(b.state == resilience.CLOSED for b in gateway.breakers.values())
    finally:
        await app.stop()


async def test_an_app_going_down_makes_its_sidecar_leave_and_come_back(shop: RoutedShop) -> None:
    app_a = await TestApp().start()
    app_b = await TestApp().start()
    b_port = app_b.port
    try:
        a = await shop.orders(app_a.port, **CHECKS)
        b = await shop.orders(b_port, **CHECKS)
        await a.wait_ready()
        await b.wait_ready()
        gateway = await shop.gateway()
        load = Load(gateway.outbound_port)
        load.start()
        await wait_for(lambda: len(app_b.requests) > 10, 15, "B serving")
        await app_b.stop()
        down_at = time.monotonic()
        await wait_for(lambda: not b.joined, 3, "B leaving")
        left_at = time.monotonic()
        assert await admin_ready(b) == 503
        served_a = len(app_a.requests)
        await wait_for(lambda: len(app_a.requests) - served_a > 50, 15, "A taking it all")
        # Nothing failed once B had left.
        assert failures(load, since=left_at) == []
        app_b = await TestApp().start(b_port)
        await wait_for(b.ready, 3, "B rejoining")
        await wait_for(lambda: len(app_b.requests) > 10, 15, "B serving again")
        await load.finish()
        # The detection window: the calls B's sidecar had taken when the app
        # died, at most (each woke a check at once).
        window = failures(load)
        assert set(window) <= {(502, "app_unreachable")}, window
        assert left_at - down_at < 1.0
        # B's refused calls were retried on A and never counted against orders.
        assert all(br.state == resilience.CLOSED for br in gateway.breakers.values())
    finally:
        await app_a.stop()
        await app_b.stop()


async def test_sigterm_leaves_the_group_before_draining(shop: RoutedShop) -> None:
    """Stopping one of two replicas under load fails no request: it leaves
    the queue group, serves what was routed to it before, then exits."""
    app_a = await TestApp().start()
    app_b = await TestApp().start()
    try:
        a = await shop.orders(app_a.port, **CHECKS)
        b = await shop.orders(app_b.port, **CHECKS)
        await a.wait_ready()
        await b.wait_ready()
        gateway = await shop.gateway()
        load = Load(gateway.outbound_port, clients=8)
        load.start()
        await wait_for(lambda: len(app_b.requests) > 20, 15, "B serving")
        await b.stop()
        served_b = len(app_b.requests)
        await asyncio.sleep(0.5)
        await load.finish()
        assert failures(load) == []
        assert len(app_b.requests) == served_b
    finally:
        await app_a.stop()
        await app_b.stop()
