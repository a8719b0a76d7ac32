"""A mesh pass that failed in places is followed by another, with backoff.

Only the scheduling is under test here (pure logic): the pass itself is
replaced by a scripted outcome, so no API server or NATS is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from natsmesh_operator.handlers.mesh import MeshReconciler, PassResult, retry_backoff
from natsmesh_operator.wiring.apply import ApplyReport
from natsmesh_operator.wiring.errors import ApplyError

pytestmark = pytest.mark.unit


class Scripted(MeshReconciler):
    """Each pass pops the next outcome; records when passes ran."""

    def __init__(self, outcomes: list[str], retry_delay: float) -> None:
        super().__init__(
            kube_client=None,  # type: ignore[arg-type]  # never called here
            nats_url="nats://unused",
            operator_namespace="natsmesh-system",
            bootstrap_secret="unused",
            retry_delay=retry_delay,
        )
        self.outcomes = outcomes
        self.ran: list[float] = []

    async def _pass_and_report(self, started: float) -> PassResult:
        self.ran.append(time.monotonic())
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        report = ApplyReport()
        if outcome == "error":
            report.errors.append(ApplyError("team", "stream EVENTS_ledger", "timeout"))
        return PassResult(
            started=started,
            report=report,
            fatal="NATS unreachable" if outcome == "fatal" else None,
        )


async def settle(mesh: Scripted, passes: int, within: float) -> None:
    async def count() -> None:
        async with mesh._finished:
            await mesh._finished.wait_for(lambda: len(mesh.ran) >= passes)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(count(), within)


async def test_a_pass_with_errors_is_retried_without_anyone_asking() -> None:
    mesh = Scripted(["error", "fatal", "ok"], retry_delay=0.05)
    try:
        first = await mesh.request()
        assert first.report is not None
        assert first.report.errors
        await settle(mesh, 3, within=2)
        assert len(mesh.ran) == 3, "the errors were not retried"
        await asyncio.sleep(0.3)
        assert len(mesh.ran) == 3, "a clean pass must not schedule another"
    finally:
        await mesh.stop()


def test_backoff_doubles_and_is_capped_by_the_retry_delay() -> None:
    assert [retry_backoff(n, 10) for n in range(6)] == [1, 2, 4, 8, 10, 10]
    assert retry_backoff(10_000, 10) == 10  # no overflow after a long outage


async def test_of_two_requests_for_a_later_pass_the_earlier_wins() -> None:
    """A retry and a held revocation's check share one timer: the sooner
    request is kept whichever came first, and a pass meets both."""
    mesh = Scripted([], retry_delay=10)
    try:
        await mesh.request()
        for delays in ((5.0, 0.05), (0.05, 5.0)):
            before = len(mesh.ran)
            for delay in delays:
                mesh._pass_later(delay)
            await settle(mesh, before + 1, within=2)
            assert len(mesh.ran) == before + 1, f"no pass within 2 s for {delays}"
        # The pass met the 5 s request too: no timer is left.
        assert mesh._later is None
    finally:
        await mesh.stop()
