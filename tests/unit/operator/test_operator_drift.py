"""kopf's peering rule as the drift loop applies it (pure logic).

kopf pauses a replica while any live peer other than itself has a priority
at least its own (``kopf/_core/engines/peering.py``); the drift loop reads
the same peering status and must come to the same verdict.
"""

from __future__ import annotations

import datetime

import pytest

from natsmesh_operator.handlers.drift import blocking_peers

pytestmark = pytest.mark.unit

NOW = datetime.datetime(2026, 12, 3, 8, 0, tzinfo=datetime.UTC)


def record(priority: int, *, age: float = 0.0, lifetime: int = 60) -> dict[str, object]:
    seen = NOW - datetime.timedelta(seconds=age)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def blocking(status: dict[str, object], priority: int = 10) -> list[str]:
    return blocking_peers(status, identity="me", priority=priority, now=NOW)


def test_alone_or_only_lower_peers_runs() -> None:
    assert blocking({}) == []
    assert blocking({"me": record(10)}) == []
    assert blocking({"me": record(10), "low": record(5)}) == []


def test_a_live_peer_of_higher_or_equal_priority_pauses() -> None:
    assert blocking({"me": record(10), "high": record(20)}) == ["high"]
    # Equal priority: kopf pauses both (it cannot tell which should act).
    assert blocking({"me": record(10), "twin": record(10)}) == ["twin"]
    # Our own record never blocks us, whatever its priority.
    assert blocking({"me": record(99)}, priority=10) == []


def test_a_dead_peer_does_not_pause() -> None:
    # Dead: last seen longer ago than its lifetime (a replica killed hard).
    assert blocking({"high": record(20, age=61)}) == []
    assert blocking({"high": record(20, age=59)}) == ["high"]
    # lifetime 0: what kopf writes for itself when it exits cleanly.
    assert blocking({"high": record(20, lifetime=0)}) == []


def test_naive_timestamps_are_utc_and_junk_entries_are_skipped() -> None:
    naive = {"priority": 20, "lifetime": 60, "lastseen": "2026-12-03T07:59:30"}
    assert blocking({"high": naive, "junk": None}) == ["high"]
