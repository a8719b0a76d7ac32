"""A rolling restart of the three-server NATS cluster under continuous traffic.

Each server in turn is restarted the way Kubernetes restarts a pod of the
chart's StatefulSet (see :mod:`tests.fixtures.nats_cluster`): lame duck mode
first, then gone, then back on its store and current. The sidecars move off a
lame-duck server before it drops them (make before break, as for new creds);
the events stream, the route bucket and the dead letters are R3, so each
keeps a quorum while one server is away. Not one checkout may fail, not one
``order.created`` may be lost, and the operator must still apply changes.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator

import pytest

from natsmesh_operator.settings import CredsSettings
from natsmesh_sidecar import subjects
from tests.change.conftest import SHOP
from tests.change.shopload import Fleet, under_traffic
from tests.fixtures.cluster import Cluster
from tests.fixtures.nats_cluster import NatsCluster
from tests.fixtures.operator import OperatorProcess, start_operator

pytestmark = [pytest.mark.change, pytest.mark.timeout(180)]

SERVERS = 3


@pytest.fixture(scope="module")
def change_operator(
    crds: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The tier's operator, on a three-server NATS cluster (NATSMESH_NATS_REPLICAS=3)."""
    grace = CredsSettings.revocation_grace_seconds
    with start_operator(
        crds, tmp_path_factory.mktemp("nats3"), revocation_grace=grace, nats_servers=SERVERS
    ) as op:
        yield op


@pytest.fixture(scope="module")
def shop_manifest() -> str:
    """The shop, its events stream asking for three replicas (the user's choice)."""
    publishes = "publishes: [{topic: order.created}]"
    assert publishes in SHOP
    return SHOP.replace(publishes, f"{publishes}\n    stream: {{replicas: {SERVERS}}}")


def stream_replicas(cluster: NatsCluster) -> dict[str, int]:
    """Replicas of every stream, by name, as the servers' /jsz reports them."""
    url = f"{cluster.monitor_url}/jsz?accounts=true&streams=true&config=true"
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - the test's server
        jsz = json.load(r)
    out: dict[str, int] = {}
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            out[stream["name"]] = int(stream["config"]["num_replicas"])
    return out


def lame_duck_moves(fleet: Fleet, outcome: str = "moves") -> int:
    name = f"natsmesh_sidecar_nats_lame_duck_{outcome}_total"
    return int(sum(r.sidecar.metrics.registry.get_sample_value(name) or 0 for r in fleet.replicas))


async def test_rolling_restart_of_the_nats_cluster(
    fleet: Fleet, change_operator: OperatorProcess, shop_namespace: str
) -> None:
    op = change_operator
    cluster = op.nats.server
    assert isinstance(cluster, NatsCluster)
    replicas = stream_replicas(cluster)
    assert replicas.get(subjects.routes_stream()) == SERVERS, replicas
    assert replicas.get(subjects.stream_name("orders")) == SERVERS, replicas
    assert replicas.get(subjects.dead_letter_stream("payments")) == SERVERS, replicas

    loop = asyncio.get_running_loop()
    async with under_traffic(f"NATS rolling restart, {SERVERS} servers", fleet) as report:
        for index in range(SERVERS):
            seconds = await loop.run_in_executor(None, cluster.roll, index)
            print(f"[change] NATS server {index} restarted in {seconds:.1f}s")
    # Every sidecar was on some server, and each server went: each moved at least once.
    assert lame_duck_moves(fleet) >= len(fleet.replicas), lame_duck_moves(fleet)
    # ... and no notice went without a move (another server was always up).
    assert lame_duck_moves(fleet, "move_failures") == 0
    report[0].check()

    # The operator's own connections came back: a new service is wired and Ready.
    op.apply(
        shop_namespace,
        "apiVersion: natsmesh.io/v1alpha1\nkind: NatsService\nmetadata: {name: audit}\n"
        "spec: {selector: {matchLabels: {app: audit}}, port: 8080}",
    )
    op.wait_ready("natsservice", "audit", shop_namespace, timeout=30)
