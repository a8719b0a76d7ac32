"""The live route table: host resolution, and hot swap from the KV watch or a file.

A :class:`Router` is an immutable compilation of one :class:`MeshTable`; a new
table builds a new Router and the sidecar swaps one reference. A request holds
the Router it started with, so a swap never changes a request half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from natsmesh_sidecar import subjects
from natsmesh_sidecar.config import Destination, MeshTable

logger = logging.getLogger(__name__)

FOUND = 0
FORBIDDEN = 1
UNKNOWN = 2

_CLUSTER_SUFFIXES = (".svc.cluster.local", ".svc")


class Router:
    """Host -> destination lookups for one table."""

    __slots__ = ("_hosts", "known", "namespace", "table")

    def __init__(self, table: MeshTable) -> None:
        self.table = table
        self.namespace = table.namespace
        self.known = frozenset(table.known) | frozenset(table.destinations)
        self._hosts: dict[str, tuple[int, str, Destination | None]] = {}

    def resolve(self, host: str) -> tuple[int, str, Destination | None]:
        """(FOUND|FORBIDDEN|UNKNOWN, ``service.namespace``, destination) for a Host value."""
        hit = self._hosts.get(host)
        if hit is not None:
            return hit
        key = self.normalize(host)
        dest = self.table.destinations.get(key)
        if dest is not None:
            result: tuple[int, str, Destination | None] = (FOUND, key, dest)
        elif key in self.known:
            result = (FORBIDDEN, key, None)
        else:
            result = (UNKNOWN, key, None)
        # Bounded: hosts come from clients, so do not let them grow the cache forever.
        if len(self._hosts) < 4096:
            self._hosts[host] = result
        return result

    def normalize(self, host: str) -> str:
        h = host.strip().lower()
        if h.startswith("["):
            return h
        h = h.rsplit(":", 1)[0] if ":" in h else h
        for suffix in _CLUSTER_SUFFIXES:
            if h.endswith(suffix):
                h = h[: -len(suffix)]
                break
        if "." not in h:
            return subjects.host_of(self.namespace, h)
        return h


def empty_table(namespace: str, service: str) -> MeshTable:
    return MeshTable(namespace=namespace, service=service)


OnTable = Callable[[MeshTable], None]


def read_bytes(path: str) -> bytes:
    """A small local file (table, creds): a blocking read is cheaper than a thread hop."""
    with open(path, "rb") as f:
        return f.read()


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


async def watch_file(path: str, on_table: OnTable, poll: float, stop: asyncio.Event) -> None:
    """Reload the table file whenever its mtime changes."""
    last: float | None = None
    while not stop.is_set():
        try:
            mtime = os.stat(path).st_mtime
            if mtime != last:
                on_table(MeshTable.from_json(read_bytes(path)))
                last = mtime
        except FileNotFoundError:
            logger.warning("table file %s missing", path)
        except Exception:
            # A bad file keeps the previous table: never drop traffic for a typo.
            logger.exception("table file %s invalid; keeping the previous table", path)
            last = _mtime(path)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll)


async def watch_kv(
    js: Any,
    service: str,
    on_table: OnTable,
    on_delete: Callable[[], None],
    stop: asyncio.Event,
    retry: float = 2.0,
    on_ready: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Follow the service's key in the routes bucket; reconnects and missing buckets retried."""
    key = subjects.routes_key(service)
    while not stop.is_set():
        watcher = None
        try:
            kv = await js.key_value(subjects.ROUTES_BUCKET)
            watcher = await kv.watch(key)
            if on_ready is not None:
                await on_ready()
            while not stop.is_set():
                try:
                    entry = await watcher.updates(timeout=1.0)
                except Exception as exc:
                    if type(exc).__name__ == "TimeoutError":
                        continue
                    raise
                if entry is None:
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    logger.warning("route table key %s deleted", key)
                    on_delete()
                    continue
                try:
                    on_table(MeshTable.from_json(entry.value))
                except Exception:
                    logger.exception(
                        "route table revision %s invalid; keeping previous", entry.revision
                    )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning(
                "route table watch on %s/%s failed: %s; retrying", subjects.ROUTES_BUCKET, key, exc
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry)
        finally:
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()
