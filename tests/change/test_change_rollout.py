"""Deploys and scaling under continuous traffic: no request fails, no event is lost.

What a Deployment with maxSurge 1 / maxUnavailable 0 does, played with real
sidecars: a new replica starts and joins its queue group once its app is
ready, then an old one is terminated (its sidecar leaves the group first and
drains what it holds). Scaling down terminates replicas the same way.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.change.shopload import Fleet, under_traffic

pytestmark = [pytest.mark.change, pytest.mark.timeout(120)]


async def test_rolling_restart_of_a_one_replica_service(fleet: Fleet) -> None:
    async with under_traffic("rolling restart, orders 1 replica", fleet) as report:
        await fleet.rolling_restart("orders")
    report[0].check()


async def test_rolling_restart_of_a_three_replica_service(fleet: Fleet) -> None:
    for _ in range(2):
        await fleet.start("orders")
    async with under_traffic("rolling restart, orders 3 replicas", fleet) as report:
        await fleet.rolling_restart("orders")
    report[0].check()


async def test_scale_three_to_one_to_three(fleet: Fleet) -> None:
    for _ in range(2):
        await fleet.start("orders")
    async with under_traffic("scale orders 3 -> 1 -> 3", fleet) as report:
        for old in fleet.of("orders")[1:]:
            await fleet.stop(old)
        await asyncio.sleep(1.0)  # one replica carries it all meanwhile
        for _ in range(2):
            await fleet.start("orders")
    report[0].check()
