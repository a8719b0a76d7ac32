"""The change tier's fixtures: one operator per module, the shop's services applied once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from lightkube import AsyncClient

from natsmesh_operator.settings import CredsSettings
from tests.change.shopload import Fleet, SecretMirror
from tests.fixtures.cluster import Cluster
from tests.fixtures.operator import OperatorProcess, kube_client, operator_namespace, start_operator

SHOP = """
apiVersion: natsmesh.io/v1alpha1
kind: NatsService
metadata: {name: gateway}
spec:
  selector: {matchLabels: {app: gateway}}
  port: 8080
  allowSameNamespace: false
---
apiVersion: natsmesh.io/v1alpha1
kind: NatsService
metadata: {name: orders}
spec:
  selector: {matchLabels: {app: orders, version: v1}}
  port: 8080
  version: v1
  allowSameNamespace: false
  allowedCallers: [{name: gateway}]
  events:
    publishes: [{topic: order.created}]
---
apiVersion: natsmesh.io/v1alpha1
kind: NatsService
metadata: {name: payments}
spec:
  selector: {matchLabels: {app: payments}}
  port: 8080
  allowSameNamespace: false
  allowedCallers: [{name: orders}]
  events:
    subscriptions:
      - {topic: order.created, service: orders, path: /events/order-created, ackWait: 5s}
---
apiVersion: natsmesh.io/v1alpha1
kind: NatsService
metadata: {name: inventory}
spec:
  selector: {matchLabels: {app: inventory}}
  port: 8080
  allowSameNamespace: false
"""
"""gateway -> orders -> payments, order.created to payments; inventory is
the service nobody in the traffic calls (its grants change under load)."""

SERVICES = ("gateway", "orders", "payments", "inventory")


@pytest.fixture(scope="module")
def change_operator(
    crds: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    # The production grace: a narrowing must be hitless because the old key
    # is revoked once the sidecars left it, not because a short grace ran out.
    grace = CredsSettings.revocation_grace_seconds
    with start_operator(crds, tmp_path_factory.mktemp("change"), revocation_grace=grace) as op:
        yield op


@pytest.fixture(scope="module")
def shop_manifest() -> str:
    """The shop's NatsServices (a module may ask for other stream settings)."""
    return SHOP


@pytest.fixture(scope="module")
def shop_namespace(change_operator: OperatorProcess, shop_manifest: str) -> Iterator[str]:
    """A namespace with the shop's NatsServices, all Ready."""
    op = change_operator
    with operator_namespace(op) as ns:
        op.cluster.kubectl("apply", "-n", ns, "-f", "-", input=shop_manifest)
        for name in SERVICES:
            op.wait_ready("natsservice", name, ns, timeout=60)
        yield ns


@pytest.fixture
async def kube(change_operator: OperatorProcess) -> AsyncIterator[AsyncClient]:
    async with kube_client(change_operator) as client:
        yield client


@pytest.fixture
async def fleet(
    change_operator: OperatorProcess, shop_namespace: str, kube: AsyncClient, tmp_path: Path
) -> AsyncIterator[Fleet]:
    """One replica each of gateway, orders and payments, serving, creds mirrored."""
    mirror = SecretMirror(kube, shop_namespace, tmp_path)
    await mirror.start(SERVICES)
    fleet = Fleet(shop_namespace, change_operator.nats.url, mirror)
    try:
        for role in ("payments", "orders", "gateway"):
            await fleet.start(role)
        yield fleet
    finally:
        await fleet.close()
        await mirror.stop()
