"""kopf handlers for NatsRoute: compile into the callers' route tables, report status."""

from __future__ import annotations

import time
from typing import Any

import kopf

from natsmesh_operator.api import GROUP, VERSION, NatsRoute
from natsmesh_operator.handlers import status
from natsmesh_operator.handlers.runtime import from_memo
from natsmesh_operator.metrics import METRICS
from natsmesh_operator.settings import OperatorSettings

PLURAL = "natsroutes"


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    retry = settings.reconcile.retry_delay

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    async def route_reconcile(
        body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any
    ) -> None:
        started = time.perf_counter()
        result = await from_memo(memo).mesh.request()
        route = NatsRoute.from_body(body)
        ns, name = str(route.metadata.namespace), str(route.metadata.name)
        conds = status.route_conditions(result, ns, name)  # already written by the pass
        METRICS.reconcile_duration.labels(kind="NatsRoute").observe(time.perf_counter() - started)
        METRICS.reconciles.labels(kind="NatsRoute", result="retry" if result.fatal else "ok").inc()
        if result.fatal:
            raise kopf.TemporaryError(f"{result.fatal}; retrying in {retry:g}s", delay=retry)
        ready = conds[-1]
        if not ready.ok:
            kopf.warn(body, reason=ready.reason, message=ready.message)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, retries=60)
    async def route_delete(memo: kopf.Memo, **_: Any) -> None:
        # Without the route the callers' tables fall back to the default policy.
        result = await from_memo(memo).mesh.request()
        if result.fatal:
            raise kopf.TemporaryError(f"{result.fatal}; retrying in {retry:g}s", delay=retry)
