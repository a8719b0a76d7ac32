"""A NatsService handler's follow-up runs after its pass, without the handler waiting.

Only the hand-over is under test (pure logic): the pass is a scripted
outcome, the restart and the event poster record their calls; no API server
or NATS is involved.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from natsmesh_operator.api import LabelSelector
from natsmesh_operator.handlers.followup import AfterPass, Followup
from natsmesh_operator.handlers.mesh import CredsOutcome, MeshReconciler, PassResult
from natsmesh_operator.wiring.apply import ApplyReport
from natsmesh_operator.wiring.plan import plan

pytestmark = pytest.mark.unit

NS = "team"


class Scripted(MeshReconciler):
    """Each pass pops the next outcome ("ok" or "fatal"); every service's creds are fine."""

    def __init__(self, outcomes: list[str]) -> None:
        super().__init__(
            kube_client=None,  # type: ignore[arg-type]  # never called here
            nats_url="nats://unused",
            operator_namespace="natsmesh-system",
            bootstrap_secret="unused",
            retry_delay=0.05,
        )
        self.outcomes = outcomes
        self.passes = 0

    async def _pass_and_report(self, started: float) -> PassResult:
        self.passes += 1
        await asyncio.sleep(0.02)  # a pass takes a while: requests meanwhile share the next
        if (self.outcomes.pop(0) if self.outcomes else "ok") == "fatal":
            return PassResult(started=started, fatal="NATS unreachable")
        ok = CredsOutcome(True, "CredentialsIssued", "current")
        creds = {(NS, f"svc-{i}"): ok for i in range(100)}
        return PassResult(started=started, plan=plan([], []), report=ApplyReport(), creds=creds)


class Rig:
    def __init__(self, outcomes: list[str]) -> None:
        self.mesh = Scripted(outcomes)
        self.events: list[tuple[str, str, str]] = []
        self.restarts: list[str] = []
        self.recounts: list[str] = []
        self.after = AfterPass(self.mesh, self.restart, self.recounts.append, self.post)

    async def restart(self, namespace: str, _selector: LabelSelector) -> list[str]:
        self.restarts.append(namespace)
        return ["Deployment/app"]

    def post(self, body: object, type_: str, reason: str, _message: str) -> None:
        name = body["metadata"]["name"]  # type: ignore[index]
        self.events.append((name, type_, reason))

    def handler(self, name: str, reason: str) -> None:
        """What service_reconcile does: ask, leave a follow-up, return."""
        ref: dict[str, object] = {
            "apiVersion": "natsmesh.io/v1alpha1",
            "kind": "NatsService",
            "namespace": NS,
            "name": name,
            "uid": f"uid-{name}",
        }
        self.after.add(
            Followup(
                ticket=self.mesh.ask(),
                reason=reason,
                ref=ref,
                selector=LabelSelector(match_labels={"app": name}),
                started=time.perf_counter(),
            )
        )

    async def served(self) -> None:
        for _ in range(300):  # 3 s at most
            if not self.after.pending():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the last batch's events
        assert not self.after.pending(), "follow-ups still waiting"

    async def stop(self) -> None:
        await self.after.stop()
        await self.mesh.stop()


async def test_a_burst_of_handlers_is_followed_up_after_a_few_shared_passes() -> None:
    rig = Rig([])
    try:
        for i in range(100):
            rig.handler(f"svc-{i}", "create")
        await rig.served()
        assert rig.mesh.passes <= 2, "each handler got a pass of its own"
        reconciled = {name for name, kind, reason in rig.events if reason == "Reconciled"}
        assert reconciled == {f"svc-{i}" for i in range(100)}
        assert len(rig.restarts) == 100
        assert ("svc-0", "Normal", "RolloutRestart") in rig.events
        assert set(rig.recounts) == {NS}
    finally:
        await rig.stop()


async def test_resume_restarts_quietly_and_update_does_not_restart() -> None:
    rig = Rig([])
    try:
        rig.handler("svc-1", "resume")
        rig.handler("svc-2", "update")
        await rig.served()
        assert ("svc-1", "Normal", "Reconciled") not in rig.events
        assert ("svc-2", "Normal", "Reconciled") in rig.events
        assert len(rig.restarts) == 1
    finally:
        await rig.stop()


async def test_a_fatal_pass_warns_and_the_follow_up_waits_for_the_next_pass() -> None:
    rig = Rig(["fatal"])
    try:
        rig.handler("svc-3", "create")
        await rig.served()
        assert rig.events[0] == ("svc-3", "Warning", "NatsUnavailable")
        assert ("svc-3", "Normal", "Reconciled") in rig.events
        assert rig.mesh.passes == 2, "the reconciler did not pass again by itself"
        assert len(rig.restarts) == 1, "restarted before the pass that issued the creds"
    finally:
        await rig.stop()


async def test_the_drift_check_asks_for_a_pass_only_when_the_last_is_old() -> None:
    rig = Rig([])
    try:
        await rig.mesh.request()
        rig.mesh.refresh(max_age=60)
        assert rig.mesh._requested == rig.mesh.served, "a fresh pass was asked for again"
        passes = rig.mesh.passes
        for _ in range(3):  # one pass asked; the others see it pending
            rig.mesh.refresh(max_age=0)
        await rig.mesh.result_of(rig.mesh.served + 1)
        assert rig.mesh.passes == passes + 1
    finally:
        await rig.stop()
