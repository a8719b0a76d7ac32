"""kopf handlers for NatsService: reconcile, delete.

The periodic drift check is one operator-level loop (:mod:`natsmesh_operator.handlers.drift`),
not a kopf timer per object.

One action per handler run: ask the mesh reconciler for a pass that includes
this change; the pass writes what it found into status, and the follow-up
(:mod:`natsmesh_operator.handlers.followup`) posts the events. NATS failures
become a False condition naming the cause and another pass, never a stack
trace in status.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf

from natsmesh_operator.api import GROUP, VERSION, NatsService
from natsmesh_operator.handlers import rollout
from natsmesh_operator.handlers.followup import Followup
from natsmesh_operator.handlers.runtime import from_memo
from natsmesh_operator.metrics import METRICS
from natsmesh_operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

PLURAL = "natsservices"


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    retry = settings.reconcile.retry_delay

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    async def service_reconcile(body: kopf.Body, memo: kopf.Memo, reason: str, **_: Any) -> None:
        # Ask for a pass and return: the follow-up (events, the rollout
        # restart, metrics) runs once the pass is over, without keeping this
        # handler and everything kopf holds for it waiting (handlers/followup.py).
        rt = from_memo(memo)
        ticket = rt.mesh.ask()
        try:
            selector = NatsService.from_body(body).spec.selector
        except ValueError:  # the pass marks it Invalid; nothing to restart
            selector = None
        meta = body["metadata"]
        ref = {
            "apiVersion": body.get("apiVersion", f"{GROUP}/{VERSION}"),
            "kind": body.get("kind", "NatsService"),
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta.get("uid"),
        }
        rt.after_pass.add(
            Followup(
                ticket=ticket,
                reason=reason,
                ref=ref,
                selector=selector,
                started=time.perf_counter(),
            )
        )

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
