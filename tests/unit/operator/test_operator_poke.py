"""Pokes (events that saw something to repair) on a replica kopf may pause.

Pure logic: the peering read is a scripted coroutine that counts its calls
and can be held open; the passes are counted by the reconciler's requests.
"""

from __future__ import annotations

import asyncio

import pytest

from natsmesh_operator.handlers.mesh import MeshReconciler

pytestmark = pytest.mark.unit


class Peering:
    """A peering read that gives its next answer once released (the last
    answer repeats)."""

    def __init__(self, *answers: bool) -> None:
        self.answers = list(answers)
        self.reads = 0
        self.release = asyncio.Event()

    async def __call__(self) -> bool:
        self.reads += 1
        await self.release.wait()
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def reconciler(peering: Peering) -> tuple[MeshReconciler, list[int]]:
    mesh = MeshReconciler(
        kube_client=None,  # type: ignore[arg-type]  # no pass runs here
        nats_url="nats://unused",
        operator_namespace="natsmesh-system",
        bootstrap_secret="unused",
    )
    asked: list[int] = []

    def ask() -> int:
        asked.append(1)
        return len(asked)

    mesh.ask = ask  # type: ignore[method-assign]
    mesh.paused = peering
    return mesh, asked


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_burst_of_pokes_is_one_peering_read_and_one_pass() -> None:
    peering = Peering(False)
    mesh, asked = reconciler(peering)
    for _ in range(50):
        mesh.poke()
    await settle()
    assert peering.reads == 1
    peering.release.set()
    await settle()
    assert asked == [1]
    # The next poke after the check is a check of its own.
    mesh.poke()
    await settle()
    assert peering.reads == 2
    assert len(asked) == 2


async def test_a_paused_replica_asks_for_nothing_and_checks_again_only_if_poked_meanwhile() -> None:
    peering = Peering(True, True, False)
    mesh, asked = reconciler(peering)
    mesh.poke()
    await settle()
    peering.release.set()
    await settle()
    assert (peering.reads, asked) == (1, [])

    # Pokes during a check that finds the replica paused: one more read
    # (the pause may have ended since), which here finds it active.
    peering.release.clear()
    mesh.poke()
    await settle()
    for _ in range(10):
        mesh.poke()
    peering.release.set()
    await settle()
    assert peering.reads == 3
    assert asked == [1]


async def test_without_peering_a_poke_asks_at_once() -> None:
    peering = Peering(True)
    mesh, asked = reconciler(peering)
    mesh.paused = None
    mesh.poke()
    assert asked == [1]
    assert peering.reads == 0


async def test_a_failed_pause_check_asks_for_nothing_and_the_next_poke_checks_again() -> None:
    reads = 0

    async def broken() -> bool:
        nonlocal reads
        reads += 1
        raise RuntimeError("peering unreadable")

    mesh, asked = reconciler(Peering(False))
    mesh.paused = broken
    mesh.poke()
    await settle()
    assert (reads, asked) == (1, [])
    mesh.poke()
    await settle()
    assert (reads, asked) == (2, [])
