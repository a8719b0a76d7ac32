"""The app container's preStop hook: the sidecar leaves before the app stops.

A native sidecar is told to stop only after its app has exited, so on its
own it learns of a pod's end from the app refusing connections. The webhook
gives the app container a preStop hook, ``GET /prestop`` on the sidecar's
admin port with the pod's token, and the kubelet sends the app SIGTERM only
once that returns. Real sidecars with real user JWTs on an operator-mode
nats-server; the route retries nothing, so a single request routed to an app
that has stopped listening would show as a failure.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from natsmesh_operator.wiring.routes import RouteDestination, RouteRule
from natsmesh_sidecar.app import Sidecar
from natsmesh_sidecar.config import Retries
from natsmesh_sidecar.readiness import PRESTOP_HEADER
from tests.fixtures.nats_operator import OperatorNats
from tests.integration.sidecar.jwt_harness import Load, RoutedShop, wait_for
from tests.integration.sidecar.sidecar_harness import TestApp, request

pytestmark = pytest.mark.integration

TOKEN = "5f0c1e7a9b2d4c6e8f0a1b3c5d7e9f10"
CHECKS = {"ready_period_seconds": 0.25, "ready_failure_threshold": 2}

#: No retries at all: what the hook saves must not be hidden by a retry.
RULE = RouteRule(
    destinations=(RouteDestination("v1"),),
    name="orders",
    timeout_ms=5000,
    retries=Retries(attempts=0),
)


@pytest.fixture
async def shop(nats_operator: OperatorNats, tmp_path: Path) -> AsyncIterator[RoutedShop]:
    async with RoutedShop.running(nats_operator, tmp_path, RULE) as s:
        yield s


async def prestop(sidecar: Sidecar, token: str | None) -> int:
    """What the kubelet's httpGet preStop hook (or someone imitating it) gets."""
    headers = [] if token is None else [(PRESTOP_HEADER, token)]
    return (await request(sidecar.admin_port, "GET", "/prestop", headers=headers)).status


def failures(load: Load) -> list[tuple[int, str]]:
    return [
        (s, json.loads(b).get("error", "") if b.startswith(b"{") else b.decode())
        for _, s, b in load.results
        if s != 200
    ]


async def test_prestop_takes_the_replica_out_before_its_app_stops(shop: RoutedShop) -> None:
    """Two replicas under load. Calls without the pod's token are refused and
    change nothing; the hook with it returns once B has left and its app
    holds nothing; then B's app stops (its SIGTERM) and not one request fails,
    with no retries configured."""
    app_a = await TestApp().start()
    app_b = await TestApp().start()
    try:
        a = await shop.orders(app_a.port, **CHECKS)
        b = await shop.orders(app_b.port, prestop_token=TOKEN, **CHECKS)
        await a.wait_ready()
        await b.wait_ready()
        gateway = await shop.gateway()
        load = Load(gateway.outbound_port, clients=8)
        load.start()
        await wait_for(lambda: len(app_b.requests) > 20, 15, "B serving")

        # The attacker's side: anyone on the pod network reaches the admin port.
        assert await prestop(b, None) == 403
        assert await prestop(b, TOKEN[:-1] + "1") == 403
        assert await prestop(a, TOKEN) == 404, "a sidecar without a token has no hook"
        assert b.joined
        assert a.joined
        served = len(app_b.requests)
        await wait_for(lambda: len(app_b.requests) > served + 10, 15, "B still serving")

        # The kubelet's hook.
        assert await prestop(b, TOKEN) == 200
        assert not b.joined
        assert b.inbound.pending() == 0
        served_b = len(app_b.requests)
        await app_b.stop()  # the app's SIGTERM, after the hook returned
        served_a = len(app_a.requests)
        await wait_for(lambda: len(app_a.requests) > served_a + 50, 15, "A taking it all")
        await load.finish()
        assert failures(load) == []
        assert len(app_b.requests) == served_b, "nothing reached B after its hook"
        # The sidecar is still up for the app finishing; its SIGTERM comes later.
        assert not b.draining
        assert await prestop(b, TOKEN) == 200, "a repeated hook is harmless"
    finally:
        await app_a.stop()
        await app_b.stop()


async def test_without_sigterm_after_the_hold_the_replica_joins_again(shop: RoutedShop) -> None:
    """A leaked token or a pod that was not stopping after all: the replica
    is out of service for ``prestop_hold_seconds`` only."""
    app = await TestApp().start()
    try:
        orders = await shop.orders(
            app.port, prestop_token=TOKEN, prestop_hold_seconds=1.0, **CHECKS
        )
        await orders.wait_ready()
        gateway = await shop.gateway()
        assert await prestop(orders, TOKEN) == 200
        assert not orders.joined
        r = await request(gateway.outbound_port, "GET", "/ok", host="orders")
        assert r.status == 503
        assert json.loads(r.body)["error"] == "no_responders"
        await wait_for(lambda: orders.joined, 5, "orders joining again after the hold")
        r = await request(gateway.outbound_port, "GET", "/ok", host="orders")
        assert r.status == 200
        # The attack again, with the token read from the pod spec: refused
        # until the app is seen restarting, so it cannot keep the replica out.
        assert await prestop(orders, TOKEN) == 409
        assert orders.joined
        r = await request(gateway.outbound_port, "GET", "/ok", host="orders")
        assert r.status == 200
    finally:
        await app.stop()


async def test_an_app_restart_after_the_hook_joins_again_and_arms_it(shop: RoutedShop) -> None:
    """The kubelet runs the hook when it restarts only the app container (a
    failed liveness probe): the pod goes on. The app going down and passing
    its check again ends the stop long before the hold, and arms the hook."""
    app = await TestApp().start()
    port = app.port
    try:
        orders = await shop.orders(port, prestop_token=TOKEN, prestop_hold_seconds=60.0, **CHECKS)
        await orders.wait_ready()
        gateway = await shop.gateway()
        assert await prestop(orders, TOKEN) == 200
        assert not orders.joined
        await app.stop()  # the kubelet kills the app container...
        checks = orders.app_ready
        assert checks is not None
        await wait_for(lambda: not checks.ready, 5, "the app seen down")
        app = await TestApp().start(port)  # ... and starts it again
        await wait_for(lambda: orders.joined, 5, "orders joining again, long before the hold")
        r = await request(gateway.outbound_port, "GET", "/ok", host="orders")
        assert r.status == 200
        assert await prestop(orders, TOKEN) == 200, "the hook is armed again"
        assert not orders.joined
    finally:
        await app.stop()
