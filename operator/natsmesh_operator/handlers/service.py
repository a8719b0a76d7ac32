"""kopf handlers for NatsService: reconcile, drift check, delete.

One action per handler run: ask the mesh reconciler for a pass that includes
this change, then write what it found into status. NATS failures become a
False condition naming the cause and a retry, never a stack trace in status.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf

from natsmesh_operator.api import GROUP, VERSION, NatsService
from natsmesh_operator.handlers import rollout, status
from natsmesh_operator.handlers.mesh import PassResult
from natsmesh_operator.handlers.runtime import from_memo
from natsmesh_operator.metrics import METRICS
from natsmesh_operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

PLURAL = "natsservices"


def _ready(result: PassResult, body: kopf.Body) -> status.Cond:
    meta = body["metadata"]
    return status.service_conditions(result, meta["namespace"], meta["name"])[-1]


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    retry = settings.reconcile.retry_delay

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    async def service_reconcile(body: kopf.Body, memo: kopf.Memo, reason: str, **_: Any) -> None:
        started = time.perf_counter()
        rt = from_memo(memo)
        result = await rt.mesh.request()
        # A service created or changed may have sidecars already connected.
        rt.endpoints.mark(body["metadata"]["namespace"], again=True)
        METRICS.reconcile_duration.labels(kind="NatsService").observe(time.perf_counter() - started)
        METRICS.reconciles.labels(
            kind="NatsService", result="retry" if result.fatal else "ok"
        ).inc()
        if result.fatal:
            kopf.warn(body, reason="NatsUnavailable", message=result.fatal)
            raise kopf.TemporaryError(f"{result.fatal}; retrying in {retry:g}s", delay=retry)
        # The reconciler wrote the status already; events tell the story.
        ready = _ready(result, body)
        if not ready.ok:
            kopf.warn(body, reason=ready.reason, message=ready.message)
        elif reason != "resume":
            kopf.event(body, type="Normal", reason="Reconciled", message=ready.message)
        if reason in ("create", "resume"):
            svc = NatsService.from_body(body)
            restarted = await rollout.restart_selected(
                rt.kube, str(svc.metadata.namespace), svc.spec.selector, injecting=True
            )
            if restarted:
                kopf.event(
                    body,
                    type="Normal",
                    reason="RolloutRestart",
                    message=f"restarted {', '.join(restarted)} to inject the sidecar",
                )

    @kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        interval=settings.reconcile.endpoints_interval,
        initial_delay=settings.reconcile.endpoints_interval,
        idle=settings.reconcile.endpoints_interval,
        registry=registry,
    )
    async def service_drift(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        # A pass repairs drift (deleted Secrets, streams, consumers come back);
        # passes are shared, so all services' timers cost one pass per interval.
        rt = from_memo(memo)
        result = await rt.mesh.recent(settings.reconcile.drift_interval)
        # The safety net under the advisories: the namespace's timers share one count.
        rt.endpoints.refresh(body["metadata"]["namespace"])
        METRICS.reconciles.labels(
            kind="NatsService", result="retry" if result.fatal else "drift"
        ).inc()

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, retries=60)
    async def service_delete(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        rt = from_memo(memo)
        # The object carries a deletionTimestamp, so the pass leaves it out:
        # its user is revoked, its Secret, consumers and stream (and the
        # account, if it was the namespace's last service) are removed.
        result = await rt.mesh.request()
        METRICS.reconciles.labels(
            kind="NatsService", result="retry" if result.fatal else "deleted"
        ).inc()
        if result.fatal:
            raise kopf.TemporaryError(
                f"cannot clean up NATS yet: {result.fatal}; retrying in {retry:g}s", delay=retry
            )
        svc = NatsService.from_body(body)
        await rollout.restart_selected(
            rt.kube, str(svc.metadata.namespace), svc.spec.selector, injecting=False
        )
