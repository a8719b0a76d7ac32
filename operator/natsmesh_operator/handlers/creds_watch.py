"""A creds Secret deleted by hand is re-issued at once, not at the next drift check.

The operator watches the Secrets it labels ``natsmesh.io/creds`` (the label
selector is applied by the API server, so no other Secret reaches the
operator) and asks for a mesh pass, without waiting for it, when one owned
by a NatsService is deleted. The pass does what a drift check would: a new
user for the service, the lost one revoked. The delete of a removed
service's Secret (by the operator, or by garbage collection) starts none.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from lightkube import AsyncClient
from lightkube.resources.core_v1 import Secret
from lightkube.types import OnErrorAction, OnErrorResult

from natsmesh_operator.handlers import kube
from natsmesh_operator.handlers.background import Background
from natsmesh_operator.metrics import METRICS
from natsmesh_operator.watched import EVERYWHERE, Watched

if TYPE_CHECKING:
    from natsmesh_operator.handlers.mesh import MeshReconciler

logger = logging.getLogger(__name__)


class CredsWatch:
    """Pokes the mesh reconciler when one of its creds Secrets is deleted."""

    def __init__(
        self,
        kube_client: AsyncClient,
        mesh: MeshReconciler,
        *,
        watched: Watched = EVERYWHERE,
        retry_delay: float = 5.0,
    ) -> None:
        self.kube = kube_client
        self.mesh = mesh
        self.watched = watched
        self.retry_delay = retry_delay
        self._watcher = Background("natsmesh-creds-watch", self._watch)

    def start(self) -> None:
        self._watcher.start()

    async def stop(self) -> None:
        await self._watcher.stop()

    def _on_error(self, exc: Exception, _count: int) -> OnErrorResult:
        # lightkube then resumes from the last resourceVersion it saw (or
        # relists when that is too old); the pause keeps an API outage from
        # becoming a busy loop.
        logger.warning("watching creds Secrets: %s; resuming in %gs", exc, self.retry_delay)
        return OnErrorResult(OnErrorAction.RETRY, sleep=self.retry_delay)

    async def _watch(self) -> None:
        # A namespaced install may not watch across the cluster (its Roles are
        # per namespace), so it watches each listed namespace instead.
        namespaces = self.watched.exact or ("*",)
        await asyncio.gather(*(self._watch_in(ns) for ns in namespaces))

    async def _watch_in(self, namespace: str) -> None:
        while True:
            try:
                async for op, secret in self.kube.watch(
                    Secret,
                    namespace=namespace,
                    labels={kube.LABEL_CREDS: "true"},
                    on_error=self._on_error,
                ):
                    if op == "DELETED" and self._ours(secret):
                        meta = secret.metadata
                        assert meta is not None
                        logger.info(
                            "creds Secret %s/%s deleted: repairing now", meta.namespace, meta.name
                        )
                        METRICS.creds_repairs.inc()
                        self.mesh.poke()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watch must outlive anything a Secret holds
                logger.exception("creds Secret watch failed; restarting")
                await asyncio.sleep(self.retry_delay)

    def _ours(self, secret: Secret) -> bool:
        """A Secret of a service the last pass issued creds for.

        Secrets of deleted services (the operator's own deletes, garbage
        collection) are not: repairing them would be a pass that does nothing.
        """
        meta = secret.metadata
        if meta is None or not self.watched(str(meta.namespace)):
            return False
        if not kube.controlled_by_natsservice(secret):
            return False
        last = self.mesh.last
        if last is None or last.fatal:
            return True
        owner = next(r.name for r in meta.ownerReferences or [] if r.controller)
        return (str(meta.namespace), owner) in last.creds
