"""A canary promoted under continuous traffic: NatsRoute weights 90/10 -> 0/100.

The callers' route tables change (the operator compiles the route into the
routes bucket, the gateway's sidecar swaps its table in place); no request
may fail while the weights move, and afterwards only v2 answers.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.change.shopload import Fleet, under_traffic
from tests.fixtures.operator import OperatorProcess

pytestmark = [pytest.mark.change, pytest.mark.timeout(120)]

ORDERS_V2 = """
apiVersion: natsmesh.io/v1alpha1
kind: NatsService
metadata: {name: orders-v2}
spec:
  service: orders
  selector: {matchLabels: {app: orders, version: v2}}
  port: 8080
  version: v2
  allowSameNamespace: false
  allowedCallers: [{name: gateway}]
  events:
    publishes: [{topic: order.created}]
"""

ROUTE = """
apiVersion: natsmesh.io/v1alpha1
kind: NatsRoute
metadata: {name: orders}
spec:
  service: orders
  rules:
    - name: canary
      destinations:
        - {version: v1, weight: 90}
        - {version: v2, weight: 10}
"""

PROMOTED = [
    {
        "name": "canary",
        "destinations": [{"version": "v1", "weight": 0}, {"version": "v2", "weight": 100}],
    }
]


async def kubectl(op: OperatorProcess, *args: str, input: str | None = None) -> None:
    await asyncio.to_thread(op.cluster.kubectl, *args, input=input)


async def test_route_weights_shift_from_90_10_to_0_100(
    fleet: Fleet, change_operator: OperatorProcess
) -> None:
    op, ns = change_operator, fleet.namespace
    await kubectl(op, "apply", "-n", ns, "-f", "-", input=ORDERS_V2 + "---\n" + ROUTE)
    await asyncio.to_thread(op.wait_ready, "natsservice", "orders-v2", ns)
    await asyncio.to_thread(op.wait_ready, "natsroute", "orders", ns)
    await fleet.mirror.watch("orders-v2")
    await fleet.start("orders", "v2", resource="orders-v2")
    async with under_traffic("route 90/10 -> 0/100", fleet) as report:
        spec = json.dumps({"spec": {"rules": PROMOTED}})
        await kubectl(op, "patch", "natsroute", "orders", "-n", ns, "--type=merge", "-p", spec)
        await asyncio.to_thread(op.wait_ready, "natsroute", "orders", ns)
        await asyncio.sleep(2.0)  # the callers' tables follow (a KV watch)
    (r,) = report
    r.check()
    before = {a.version for a in r.steady}
    last = {a.version for a in r.during[-50:]}
    assert before == {"v1", "v2"}, before
    assert last == {"v2"}, last
