"""The services of the sidecar's own namespace, read when first called.

Each service's policy for its namespace's callers (versions and weights, rules,
who it admits) is one KV value, ``to.<service>`` in the route bucket: a
namespace of N services keeps N of them, where a table per caller listing
every callee kept N². A sidecar fetches a target with a direct get on its
first call to it, keeps it, and follows changes through one plain
subscription on ``$KV.natsmesh-routes.to.*``. Values are signed like the
tables (:mod:`natsmesh_sidecar.signing`); an unsigned or foreign one is never
used. A target that does not exist is remembered briefly (a 404), so a new
service becomes callable within :data:`MISS_TTL` without a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from natsmesh_sidecar import signing, subjects
from natsmesh_sidecar.wire import (
    Destination,
    Target,
    WireError,
    invalid_subject,
    parse_target,
)

logger = logging.getLogger(__name__)

#: Seconds a missing target is remembered before it is asked for again.
MISS_TTL = 2.0
#: At most this many targets are cached (hosts come from the app's requests).
MAX_TARGETS = 10_000
#: What :meth:`TargetCache.cached` says when it must ask the server.
MISS = object()


class TargetCache:
    """Targets of ``namespace`` by service name; see the module docstring."""

    def __init__(self, namespace: str, *, account: str | None, wait: float = 2.0) -> None:
        self.namespace = namespace
        #: The account key that must have signed a value (None: a dev server).
        self.account = account
        self.wait = wait
        self.found: dict[str, Target] = {}
        #: The destination of each found target, built once (not per request).
        self.destinations: dict[str, Destination] = {}
        self.missing: dict[str, float] = {}
        self._pending: dict[str, asyncio.Future[Target | None]] = {}
        self._nc: Any = None
        self._sub: Any = None

    async def start(self, nc: Any) -> None:
        """Follow updates on ``nc`` (called again on every new connection)."""
        self._nc = nc
        self.reset()
        self._sub = await nc.subscribe(
            f"$KV.{subjects.ROUTES_BUCKET}.{subjects.TARGET_KEY_PREFIX}*", cb=self._on_msg
        )

    def reset(self) -> None:
        """Forget everything: values put while we were away are not replayed."""
        self.found.clear()
        self.destinations.clear()
        self.missing.clear()

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def cached(self, service: str) -> Target | object | None:
        """The target, None if known missing, :data:`MISS` if it must be fetched."""
        hit = self.found.get(service)
        if hit is not None:
            return hit
        missed = self.missing.get(service)
        if missed is not None and time.monotonic() - missed < MISS_TTL:
            return None
        return MISS

    async def get(self, service: str) -> Target | None:
        """The target of ``service`` (fetched once; concurrent callers share it)."""
        hit = self.cached(service)
        if hit is not MISS:
            return hit if isinstance(hit, Target) else None
        pending = self._pending.get(service)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._pending[service] = pending
            try:
                pending.set_result(await self._fetch(service))
            except Exception as exc:  # never leave the sharers waiting
                pending.set_exception(exc)
            finally:
                self._pending.pop(service, None)
        return await asyncio.shield(pending)

    async def _fetch(self, service: str) -> Target | None:
        nc = self._nc
        if nc is None or not subjects.is_name(service):
            return None
        direct = (
            f"{subjects.JS_API_PREFIX}.DIRECT.GET.{subjects.routes_stream()}."
            f"{subjects.target_key_subject(service)}"
        )
        try:
            msg = await nc.request(direct, b"", timeout=self.wait)
        except Exception as exc:
            # Not cached: the next call asks again.
            logger.warning("target %s: direct get failed: %s", service, exc)
            raise
        hdrs = msg.headers or {}
        if hdrs.get("Status"):  # 404: no such key
            self._forget(service)
            return None
        return self._entry(service, hdrs, msg.data)

    def _on_msg_sync(self, subject: str, hdrs: dict[str, str], data: bytes) -> None:
        service = subject.rsplit(".", 1)[-1]
        if service not in self.found and service not in self.missing:
            return  # not one of ours: learnt when first called
        self._entry(service, hdrs, data)

    async def _on_msg(self, msg: Any) -> None:
        self._on_msg_sync(msg.subject, msg.headers or {}, msg.data)

    def _entry(self, service: str, hdrs: dict[str, str], data: bytes) -> Target | None:
        """Apply one entry of ``to.<service>`` (fetched or followed); what we now hold."""
        key = subjects.target_key(service)
        if self.account is not None and not signing.entry_verified(self.account, key, hdrs, data):
            logger.warning("target %s: ignored an entry not signed by the account", service)
            return self.found.get(service)
        if signing.is_delete(hdrs, data):
            self._forget(service)
            return None
        try:
            target = parse_target(data)
        except WireError as exc:
            logger.error("target %s invalid (%s); keeping what we had", service, exc)
            return self.found.get(service)
        if target.namespace != self.namespace or target.service != service:
            logger.warning(
                "target %s: value names %s.%s", service, target.service, target.namespace
            )
            return self.found.get(service)
        bad = invalid_subject(target.rules)
        if bad is not None:
            logger.error("target %s rejected: invalid subject %r", service, bad)
            return self.found.get(service)
        if len(self.found) >= MAX_TARGETS and service not in self.found:
            self.found.clear()
            self.destinations.clear()
        self.found[service] = target
        self.destinations[service] = target.destination()
        self.missing.pop(service, None)
        return target

    def _forget(self, service: str) -> None:
        self.found.pop(service, None)
        self.destinations.pop(service, None)
        if len(self.missing) >= MAX_TARGETS:
            self.missing.clear()
        self.missing[service] = time.monotonic()
