"""A stream or consumer deleted behind the operator's back is recreated at once.

JetStream announces a deletion with ``$JS.EVENT.ADVISORY.STREAM.DELETED.<stream>``
(and ``...CONSUMER.DELETED.<stream>.<consumer>``), but only inside the
account that held it: the system account does not see it. So the operator
holds one connection per namespace account it manages, as a user of its own
that may subscribe to those two advisories and publish nothing, and asks for
a mesh pass (without waiting for it) when one arrives. The user expires
after :data:`WATCH_TTL` seconds and is replaced before then; a deletion in
that short gap, or while NATS is away, is repaired by the drift loop (handlers/drift.py).
The operator's own prunes announce themselves too; a deletion of something
the last pass did not plan is ignored, so they start no pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from nats.aio.msg import Msg

from natsmesh_operator.handlers.background import Background, cancel
from natsmesh_operator.metrics import METRICS
from natsmesh_operator.wiring.apply import admin_creds, connect_creds
from natsmesh_sidecar import subjects

if TYPE_CHECKING:
    from natsmesh_operator.handlers.mesh import MeshReconciler

logger = logging.getLogger(__name__)

DELETED = ("$JS.EVENT.ADVISORY.STREAM.DELETED.*", "$JS.EVENT.ADVISORY.CONSUMER.DELETED.*.*")
WATCH_TTL = 3600
"""Seconds a watch user lives; replaced :data:`RENEW_BEFORE` seconds earlier."""
RENEW_BEFORE = 60
CONNECT_CONCURRENCY = 8
SYNC_INTERVAL = 1.0
"""Seconds between looks at which namespaces the last pass managed."""


class StreamWatch:
    """One subscribe-only connection per managed namespace account, poking the reconciler."""

    def __init__(
        self,
        mesh: MeshReconciler,
        *,
        watched: Callable[[str], bool] = lambda _: True,
        retry_delay: float = 5.0,
        ttl: int = WATCH_TTL,
    ) -> None:
        self.mesh = mesh
        self.watched = watched
        self.retry_delay = retry_delay
        self.ttl = ttl
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._syncer = Background("natsmesh-stream-watch", self._sync)
        # A start with many namespaces opens their watches a few at a time.
        self._connecting = asyncio.Semaphore(CONNECT_CONCURRENCY)

    def start(self) -> None:
        self._syncer.start()

    async def stop(self) -> None:
        await self._syncer.stop()
        await cancel(*self._tasks.values())
        self._tasks.clear()

    def watching(self) -> list[str]:
        return sorted(self._tasks)

    async def _sync(self) -> None:
        """Follow the namespaces of the last successful pass: a watch each, no more."""
        while True:
            last = self.mesh.last
            if last is not None and last.plan is not None and not last.fatal:
                wanted = {ns for ns in last.plan.accounts if self.watched(ns)}
                for ns in set(self._tasks) - wanted:
                    self._tasks.pop(ns).cancel()
                for ns in wanted - set(self._tasks):
                    self._tasks[ns] = asyncio.create_task(
                        self._watch(ns), name=f"natsmesh-stream-watch-{ns}"
                    )
            await asyncio.sleep(SYNC_INTERVAL)

    async def _watch(self, namespace: str) -> None:
        while True:
            account = (await self.mesh.keys()).existing_account(namespace)
            closed = asyncio.Event()

            async def on_closed(closed: asyncio.Event = closed) -> None:
                closed.set()

            try:
                if account is None:
                    raise LookupError(f"no account key for {namespace}")
                creds = admin_creds(account, ttl=self.ttl, subscribe_only=DELETED)
                async with self._connecting:
                    nc = await connect_creds(self.mesh.nats_url, creds, closed_cb=on_closed)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("stream watch of %s unavailable: %s", namespace, exc)
                await asyncio.sleep(self.retry_delay)
                continue
            try:
                for subject in DELETED:
                    await nc.subscribe(subject, cb=self._on_deleted(namespace))
                await nc.flush()
                with contextlib.suppress(TimeoutError):
                    # Renewed before the server would drop the expired user.
                    await asyncio.wait_for(closed.wait(), self.ttl - RENEW_BEFORE)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("stream watch of %s failed: %s", namespace, exc)
                await asyncio.sleep(self.retry_delay)
            finally:
                with contextlib.suppress(Exception):
                    await nc.close()

    def _wanted(self, namespace: str, what: str) -> bool:
        """Whether the last plan wants what was deleted (``STREAM.DELETED.<s>``
        or ``CONSUMER.DELETED.<s>.<c>``)."""
        last = self.mesh.last
        if last is None or last.plan is None:
            return True
        kind, _, name = what.partition(".DELETED.")
        if kind == "STREAM":
            return name == subjects.routes_stream() or any(
                s.namespace == namespace and s.name == name for s in last.plan.streams
            )
        stream, _, consumer = name.partition(".")
        return any(
            c.namespace == namespace and (c.stream, c.name) == (stream, consumer)
            for c in last.plan.consumers
        )

    def _on_deleted(self, namespace: str) -> Callable[[Msg], Awaitable[None]]:
        async def deleted(msg: Msg) -> None:
            what = msg.subject.removeprefix("$JS.EVENT.ADVISORY.")
            if not self._wanted(namespace, what):
                return  # the operator's own prune of what it no longer plans
            logger.info("%s in %s: repairing now", what, namespace)
            METRICS.jetstream_repairs.inc()
            self.mesh.poke()

        return deleted
