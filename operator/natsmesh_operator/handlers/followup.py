"""What a NatsService's handler does once the mesh pass it asked for is over.

A handler used to wait inside kopf for its pass: a burst of 1,000 creates
parked 1,000 kopf handler invocations (a dozen coroutines each, with the
body, patch, diff, loggers and contextvars they hold) for as long as the
passes took, and that was most of the operator's peak memory. Now the
handler asks for a pass, leaves a :class:`Followup` here (a few names) and
returns; one task waits for the passes and does, per follow-up, what the
handler did after its pass: the Kubernetes events, the rollout restart that
injects the sidecar, the metrics, the endpoint recount.

A pass that could not run (NATS or the API unreachable) keeps the follow-ups
for the next one, which the reconciler schedules by itself (backoff up to
``retry_delay``); each such pass posts the ``NatsUnavailable`` warning, as
kopf's retry of the handler did. The status is the pass's to write, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import kopf

from natsmesh_operator.api import LabelSelector
from natsmesh_operator.handlers import bounded, status
from natsmesh_operator.handlers.background import cancel
from natsmesh_operator.handlers.mesh import MeshReconciler, PassResult
from natsmesh_operator.metrics import METRICS

logger = logging.getLogger(__name__)

CONCURRENCY = 16
"""Follow-ups handled at once (each restart lists the namespace's workloads)."""

Restart = Callable[[str, LabelSelector], Awaitable[list[str]]]
"""Restart the workloads a selector picks in a namespace; ``Kind/name`` of each."""
Post = Callable[[kopf.Body, str, str, str], None]
"""Post a Kubernetes event: body, type, reason, message."""


def kopf_event(body: kopf.Body, type_: str, reason: str, message: str) -> None:
    """Through kopf's event queue (batched, retried), as handlers post them."""
    kopf.event(body, type=type_, reason=reason, message=message)


@dataclass(frozen=True)
class Followup:
    """What is left to do for one handler run: only names, no body."""

    ticket: int
    """The pass request it waits for (:meth:`MeshReconciler.ask`)."""
    reason: str
    """kopf's: create, update or resume."""
    ref: dict[str, object]
    """apiVersion, kind, namespace, name, uid: what an event names."""
    selector: LabelSelector | None
    """None for a body the models refuse (the pass marks it Invalid)."""
    started: float

    @property
    def namespace(self) -> str:
        return str(self.ref["namespace"])

    @property
    def name(self) -> str:
        return str(self.ref["name"])

    def body(self) -> kopf.Body:
        """A body holding only what kopf's events read (the reference)."""
        meta = {k: self.ref[k] for k in ("namespace", "name", "uid")}
        raw = {"apiVersion": self.ref["apiVersion"], "kind": self.ref["kind"], "metadata": meta}
        return kopf.Body(cast(Any, raw))


class AfterPass:
    """Follow-ups waiting for their pass, and the one task that serves them."""

    def __init__(
        self,
        mesh: MeshReconciler,
        restart: Restart,
        recount: Callable[[str], None],
        post: Post = kopf_event,
    ) -> None:
        self.mesh = mesh
        self.restart = restart
        self.recount = recount
        self.post = post
        self._waiting: list[Followup] = []
        self._added = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, followup: Followup) -> None:
        """Keep ``followup`` until its pass is over.

        Call it from a kopf handler: the serving task starts in the first
        caller's context, where kopf keeps the queue its events go to.
        """
        self._waiting.append(followup)
        self._added.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._serve(), name="natsmesh-after-pass")

    def pending(self) -> int:
        return len(self._waiting)

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    async def _serve(self) -> None:
        while True:
            await self._added.wait()
            self._added.clear()
            while self._waiting:
                oldest = min(f.ticket for f in self._waiting)
                result = await self.mesh.result_of(oldest)
                served = self.mesh.served
                due = [f for f in self._waiting if f.ticket <= served]
                self._waiting = [f for f in self._waiting if f.ticket > served]
                if result.fatal:
                    self._waiting = due + self._waiting  # the reconciler passes again by itself
                    for f in due:
                        self.post(f.body(), "Warning", "NatsUnavailable", result.fatal)
                        METRICS.reconciles.labels(kind="NatsService", result="retry").inc()
                    # The reconciler schedules the next pass after a failed one.
                    await self.mesh.result_of(served + 1)
                    continue
                await self._finish(due, result)

    async def _finish(self, due: list[Followup], result: PassResult) -> None:
        async def one(f: Followup) -> None:
            try:
                await self._after(f, result)
            except Exception:  # one service's follow-up must not stop the others'
                logger.exception("after the pass of %s/%s", f.namespace, f.name)

        await bounded.each(due, one, CONCURRENCY)

    async def _after(self, f: Followup, result: PassResult) -> None:
        # A service created or changed may have sidecars already connected.
        self.recount(f.namespace)
        METRICS.reconcile_duration.labels(kind="NatsService").observe(
            time.perf_counter() - f.started
        )
        METRICS.reconciles.labels(kind="NatsService", result="ok").inc()
        # The reconciler wrote the status already; events tell the story.
        ready = status.service_conditions(result, f.namespace, f.name)[-1]
        body = f.body()
        if not ready.ok:
            self.post(body, "Warning", ready.reason, ready.message)
        elif f.reason != "resume":
            self.post(body, "Normal", "Reconciled", ready.message)
        if f.reason in ("create", "resume") and f.selector is not None:
            restarted = await self.restart(f.namespace, f.selector)
            if restarted:
                message = f"restarted {', '.join(restarted)} to inject the sidecar"
                self.post(body, "Normal", "RolloutRestart", message)
