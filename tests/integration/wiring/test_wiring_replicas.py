"""The mesh's own streams follow the NATS cluster: raised in place, R1 to R3.

A three-server operator-mode cluster (tests/fixtures/nats_cluster.py). An
operator that ran with ``NATSMESH_NATS_REPLICAS=1`` made the route bucket and
the dead-letter streams R1; one started with 3 must raise them with a stream
update (no data lost: the route tables are still there), while a NatsService's
events stream keeps the replicas its spec asks for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from nats import errors as nats_errors
from nats.aio.client import Client as NATS

from natsmesh_operator.wiring.apply import admin_creds
from natsmesh_operator.wiring.plan import plan
from natsmesh_sidecar import subjects
from tests.fixtures.nats_operator import OperatorNats, shop_intents, start_operator_nats

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

NS = "shop"


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[OperatorNats]:
    on = start_operator_nats(tmp_path, servers=3)
    try:
        yield on
    finally:
        on.server.stop()


async def stream_info(nc: NATS, name: str) -> dict[str, Any]:
    """The stream's info once it has a leader.

    Right after an R1 -> R3 update the stream's new group elects a leader and
    nobody answers STREAM.INFO meanwhile (seen at 5 s on a busy box); the
    figures asked for are the same before and after, so the read waits for
    the election, bounded.
    """
    deadline = time.monotonic() + 30
    while True:
        try:
            msg = await nc.request(f"{subjects.JS_API_PREFIX}.STREAM.INFO.{name}", b"", timeout=5)
            return cast(dict[str, Any], json.loads(msg.data))
        except nats_errors.TimeoutError:
            if time.monotonic() > deadline:
                raise


async def replicas_and_messages(on: OperatorNats) -> dict[str, tuple[int, int]]:
    nc = await on.connect(admin_creds(on.keyring.account(NS)))
    try:
        out = {}
        for name in (
            subjects.routes_stream(),
            subjects.stream_name("orders"),
            subjects.dead_letter_stream("payments"),
        ):
            info = await stream_info(nc, name)
            out[name] = (info["config"]["num_replicas"], info["state"]["messages"])
        return out
    finally:
        await nc.close()


async def test_an_r1_route_bucket_is_raised_to_the_cluster_size_in_place(
    nats_cluster: OperatorNats,
) -> None:
    on = nats_cluster
    p = plan(shop_intents(NS))
    async with on.applier() as a:
        assert (await a.apply(p)).ok
    before = await replicas_and_messages(on)
    assert {r for r, _ in before.values()} == {1}, before

    raised = on.applier()
    raised.replicas = 3
    async with raised as a:
        report = await a.apply(p)
    assert report.ok, report.errors
    # The route bucket and every dead-letter stream (payments', inventory's); not the events.
    mesh_own = [subjects.routes_stream()] + [
        subjects.dead_letter_stream(s) for s in ("payments", "inventory")
    ]
    assert sorted(report.streams_updated) == sorted(f"{NS}/{n}" for n in mesh_own)
    assert not report.streams_created
    assert not report.kv_put
    after = await replicas_and_messages(on)
    routes, dlq, events = (
        subjects.routes_stream(),
        subjects.dead_letter_stream("payments"),
        subjects.stream_name("orders"),
    )
    assert before[routes][1] > 0
    assert after[routes] == (3, before[routes][1]), (before, after)
    assert after[dlq][0] == 3
    # The NatsService's own stream: its spec's replicas (1 here), not the cluster's.
    assert after[events][0] == 1
