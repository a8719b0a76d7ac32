"""Grants, creds and the operator changing under continuous traffic.

The traffic (gateway -> orders -> payments and order.created to payments)
never touches inventory, yet a grant on inventory changes the gateway's JWT
(callers' JWTs list what they may call): adding gateway to inventory's
allowedCallers grows it (same key, new JWT: a renewal), removing it narrows
it (a new key, the old one revoked once no connection uses it). Every
sidecar takes new creds up make before break; no request may fail meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest

from tests.change.shopload import Fleet, under_traffic
from tests.fixtures.operator import OperatorProcess, claims

pytestmark = [pytest.mark.change, pytest.mark.timeout(120)]


async def patch(op: OperatorProcess, namespace: str, kind: str, name: str, spec: object) -> None:
    """kubectl patch off the event loop (the traffic runs on it)."""
    await asyncio.to_thread(
        op.cluster.kubectl,
        "patch", kind, name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": spec}),
    )  # fmt: skip


async def wait_written(fleet: Fleet, service: str, before: int, within: float = 15.0) -> None:
    """The operator re-issued ``service``'s creds: the mirror wrote them a ``before+1``th time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while fleet.mirror.writes.get(service, 0) <= before:
        assert loop.time() < deadline, f"{service}'s creds were not re-issued in {within}s"
        await asyncio.sleep(0.05)


async def new_creds(fleet: Fleet, service: str, before: int, within: float = 15.0) -> None:
    """The operator re-issued ``service``'s creds and its sidecars sign with them."""
    await wait_written(fleet, service, before, within)
    await fleet.take_up(service)


TOPICS = {"events": {"publishes": [{"topic": "order.created"}]}}
MORE_TOPICS = {"events": {"publishes": [{"topic": "order.created"}, {"topic": "order.cancelled"}]}}


def user_key(fleet: Fleet, service: str) -> str:
    return str(claims(fleet.mirror.path(service).read_text())["sub"])


async def test_a_grant_added_and_removed_on_another_service(
    fleet: Fleet, change_operator: OperatorProcess
) -> None:
    op, ns = change_operator, fleet.namespace
    before = {svc: fleet.mirror.path(svc).read_text() for svc in ("gateway", "orders")}
    key = user_key(fleet, "inventory")
    async with under_traffic("grant on inventory added and removed", fleet) as report:
        writes = fleet.mirror.writes["inventory"]
        await patch(op, ns, "natsservice", "inventory", {"allowedCallers": [{"name": "gateway"}]})
        await wait_written(fleet, "inventory", writes)
        grown = user_key(fleet, "inventory")
        writes = fleet.mirror.writes["inventory"]
        await patch(op, ns, "natsservice", "inventory", {"allowedCallers": None})
        await wait_written(fleet, "inventory", writes)
        narrowed = user_key(fleet, "inventory")
    report[0].check()
    # What the change was: inventory's JWT grew (same key), then narrowed (a
    # new key); the callers' creds were not touched at all.
    assert grown == key
    assert narrowed != key
    assert {svc: fleet.mirror.path(svc).read_text() for svc in before} == before


async def test_creds_renewed(fleet: Fleet, change_operator: OperatorProcess) -> None:
    """orders' permissions grow: a new JWT for the same key, taken up make
    before break (what an expiry-driven renewal does)."""
    op, ns = change_operator, fleet.namespace
    key = user_key(fleet, "orders")
    async with under_traffic("orders' creds renewed (same key)", fleet) as report:
        writes = fleet.mirror.writes["orders"]
        await patch(op, ns, "natsservice", "orders", MORE_TOPICS)
        await new_creds(fleet, "orders", writes)
    report[0].check()
    assert user_key(fleet, "orders") == key
    # Back as it was (a narrowing: see the next test), outside the traffic.
    writes = fleet.mirror.writes["orders"]
    await patch(op, ns, "natsservice", "orders", TOPICS)
    await new_creds(fleet, "orders", writes)


REVOKED_WITHIN = 15.0
"""Seconds after the change by which the old key must be refused: far below the
90 s grace, so it is the sidecars leaving the key that ends the hold."""


async def test_creds_reissued_with_a_new_key(
    fleet: Fleet, change_operator: OperatorProcess
) -> None:
    """orders' permissions narrow: a new key; the old one is revoked once
    orders' sidecar moved to the new creds (make before break)."""
    op, ns = change_operator, fleet.namespace
    writes = fleet.mirror.writes["orders"]
    await patch(op, ns, "natsservice", "orders", MORE_TOPICS)
    await new_creds(fleet, "orders", writes)
    key = user_key(fleet, "orders")
    old = fleet.mirror.path("orders").read_text()
    async with under_traffic("orders' creds re-issued (new key)", fleet) as report:
        writes = fleet.mirror.writes["orders"]
        await patch(op, ns, "natsservice", "orders", TOPICS)
        await new_creds(fleet, "orders", writes)
        changed = time.monotonic()
    report[0].check()
    assert user_key(fleet, "orders") != key
    # Still a revocation, not a leak: a copy of the old creds stops working
    # once no connection uses the key, long before the grace.
    await op.refused_within(old, REVOKED_WITHIN)
    print(f"[change] old key refused {time.monotonic() - changed:.1f}s after the take-up")
    assert await op.connects(fleet.mirror.path("orders").read_text())


async def test_the_operator_killed_and_restarted(
    fleet: Fleet, change_operator: OperatorProcess
) -> None:
    op = change_operator
    async with under_traffic("operator killed -9 and restarted", fleet) as report:
        await asyncio.to_thread(op.stop, signal.SIGKILL)
        await asyncio.to_thread(op.start)
        # Its first passes (endpoints, drift, creds) run against the live mesh.
        await asyncio.sleep(3)
    report[0].check()
