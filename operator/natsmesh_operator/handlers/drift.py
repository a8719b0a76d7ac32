"""The drift loop: one operator-level check every ``endpoints_interval``.

It replaces a kopf timer per NatsService, which cost ~16 KiB per object
(kopf keeps a live body and a task per object with a timer: docs/performance.md).
Each tick does what every timer did, once: a mesh pass unless one ran within
``drift_interval`` (it repairs deleted Secrets, streams, consumers), and the
endpoint count's safety net for each namespace that has NatsServices.

kopf pauses the handlers and timers of a standby replica (peering), and this
loop must pause with them, else two replicas write. kopf keeps its pause state
in a toggle local to ``kopf._core.reactor.running.spawn_tasks``, reachable only
through private frames, so the loop reads the peering object kopf itself
reads (one GET per tick) and applies kopf's rule (``kopf/_core/engines/peering.py``,
``process_peering_event``): pause while any live peer other than us has a
priority at least ours, or while the object is missing (peering is mandatory
when named). The object's ``status`` (identity -> priority, lifetime, lastseen)
is the protocol between kopf versions, so it is the least likely part to change.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_global_resource, create_namespaced_resource

from natsmesh_operator.handlers.background import Background
from natsmesh_operator.handlers.mesh import MeshReconciler
from natsmesh_operator.handlers.presence import EndpointTracker
from natsmesh_operator.metrics import METRICS

logger = logging.getLogger(__name__)

ClusterKopfPeering = create_global_resource(
    "kopf.dev", "v1", "ClusterKopfPeering", "clusterkopfpeerings"
)
KopfPeering = create_namespaced_resource("kopf.dev", "v1", "KopfPeering", "kopfpeerings")


def blocking_peers(
    status: Mapping[str, Any],
    *,
    identity: str,
    priority: int,
    now: datetime.datetime,
) -> list[str]:
    """The peers kopf pauses us for: live, not us, priority ≥ ours (kopf's rule)."""
    out = []
    for peer, info in status.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        lastseen = info.get("lastseen")
        seen = datetime.datetime.fromisoformat(lastseen) if lastseen else now
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=datetime.UTC)
        if seen + datetime.timedelta(seconds=int(info.get("lifetime", 60))) <= now:
            continue  # dead: kopf ignores it (and cleans it up)
        if int(info.get("priority", 0)) >= priority:
            out.append(peer)
    return sorted(out)


class Peering:
    """Whether kopf has paused this replica, read from its peering object."""

    def __init__(
        self, kube: AsyncClient, *, name: str, identity: str, priority: int, clusterwide: bool
    ) -> None:
        self.kube = kube
        self.name = name
        self.identity = identity
        self.priority = priority
        self.clusterwide = clusterwide

    async def paused(self, namespace: str) -> bool:
        """``namespace``: one this replica serves (namespaced kopf peers per namespace;
        every replica keeps itself alive in each, so one tells the verdict)."""
        obj: Any
        try:
            if self.clusterwide:
                obj = await self.kube.get(ClusterKopfPeering, self.name)
            else:
                obj = await self.kube.get(KopfPeering, self.name, namespace=namespace)
        except ApiError as exc:
            # Missing: kopf pauses too (mandatory peering). Any other error: a
            # skipped tick delays a repair, a wrong guess makes two writers.
            logger.warning("drift loop: cannot read peering %r: %s", self.name, exc)
            return True
        status = obj.get("status") or {}
        blocking = blocking_peers(
            status,
            identity=self.identity,
            priority=self.priority,
            now=datetime.datetime.now(datetime.UTC),
        )
        if blocking:
            logger.debug("drift loop paused for peers %s", blocking)
        return bool(blocking)


class DriftLoop:
    """Every ``interval``: a drift pass and the endpoint counts, unless paused."""

    def __init__(
        self,
        mesh: MeshReconciler,
        endpoints: EndpointTracker,
        *,
        interval: float,
        drift_interval: float,
        peering: Peering | None,
        namespaces: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.mesh = mesh
        self.endpoints = endpoints
        self.interval = interval
        self.drift_interval = drift_interval
        self.peering = peering
        self._namespaces = namespaces or self._from_last_pass
        self._known: frozenset[str] = frozenset()
        self.ticks = 0
        """Ticks that did their work (not paused, something to check): for tests."""
        self._task = Background("natsmesh-drift-loop", self._loop)

    def _from_last_pass(self) -> Iterable[str]:
        # The last plan's accounts are the namespaces with (valid) NatsServices:
        # no LIST per tick. A pass that failed has no plan: keep the last known.
        last = self.mesh.last
        if last is not None and last.plan is not None:
            self._known = frozenset(last.plan.accounts)
        return self._known

    def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("drift loop tick failed")

    async def tick(self) -> bool:
        """One check; False when paused or when no namespace has NatsServices
        (the timers it replaces ran only on existing objects)."""
        namespaces = sorted(self._namespaces())
        if not namespaces:
            return False
        if self.peering is not None and await self.peering.paused(namespaces[0]):
            return False
        self.ticks += 1
        self.mesh.refresh(self.drift_interval)
        for ns in namespaces:
            self.endpoints.refresh(ns)
        last = self.mesh.last
        METRICS.reconciles.labels(
            kind="NatsService", result="retry" if last is not None and last.fatal else "drift"
        ).inc()
        return True
