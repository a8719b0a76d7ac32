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
from collections.abc import Callable
from typing import Any

from natsmesh_sidecar import signing, subjects
from natsmesh_sidecar.wire import Destination, MeshTable, parse_table

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


async def watch_file(
    path: str, on_table: OnTable, poll: float, stop: asyncio.Event, since: float | None = None
) -> None:
    """Reload the table file whenever its mtime changes from ``since`` (the
    mtime of the table applied at start: it is not applied a second time)."""
    last = since
    while not stop.is_set():
        try:
            mtime = os.stat(path).st_mtime
            if mtime != last:
                on_table(parse_table(read_bytes(path)))
                last = mtime
        except FileNotFoundError:
            logger.warning("table file %s missing", path)
        except Exception:
            # A bad file keeps the previous table: never drop traffic for a typo.
            logger.exception("table file %s invalid; keeping the previous table", path)
            last = _mtime(path)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll)


class KvWatch:
    """Follow the service's key in the routes bucket with the least privilege.

    The user may not create an unfiltered consumer on the bucket (that would
    read every service's table), so no ordered-consumer watch: a plain
    subscription on the key's own subject (``$KV.natsmesh-routes.<service>``:
    every put of the operator arrives there) plus a direct get of the last
    value at start and after every reconnect (puts while disconnected are
    not replayed to a plain subscription). Both are exactly what the user's
    JWT allows.

    A read that fails (a NATS server too slow to answer within its wait,
    JetStream not back yet after a restart) is tried again in the background,
    with backoff, until one succeeds or a put arrives: otherwise the sidecar
    would serve without its table until the operator's next put, which may
    never come for a service nobody changes.
    """

    #: Seconds before the first retry of a failed read; doubled up to RETRY_MAX.
    RETRY_FIRST = 0.25
    RETRY_MAX = 10.0

    def __init__(
        self,
        service: str,
        on_table: OnTable,
        on_delete: Callable[[], None],
        *,
        parse: Callable[[bytes], MeshTable] = parse_table,
        account: str | None = None,
    ) -> None:
        self.service = service
        #: The account key that must have signed what we apply (None: no
        #: creds, a dev server; see natsmesh_sidecar.signing).
        self.account = account
        self.subject = subjects.routes_key_subject(service)
        self.direct = (
            f"{subjects.JS_API_PREFIX}.DIRECT.GET.{subjects.routes_stream()}.{self.subject}"
        )
        self.on_table = on_table
        self.on_delete = on_delete
        self.parse = parse
        self.sub: Any = None
        self.last: bytes | None = None
        #: Entries heard on the subscription: a put arriving ends a retry loop.
        self.heard = 0
        self._retry: asyncio.Task[None] | None = None

    async def start(self, nc: Any) -> None:
        """Subscribe on ``nc`` and read the current value (again on every new
        connection); a failed read is retried in the background."""
        if self._retry is not None:
            self._retry.cancel()  # it asks on an older connection
            self._retry = None
        self.sub = await nc.subscribe(self.subject, cb=self._on_msg)
        try:
            await nc.flush()
        except Exception as exc:
            # The SUB goes out with the next write; the read does not need it.
            logger.warning("route table %s: subscribe not confirmed: %s", self.subject, exc)
        if not await self.refresh(nc):
            self.refresh_soon(nc)

    async def _on_msg(self, msg: Any) -> None:
        self.heard += 1
        self._apply(msg.headers or {}, msg.data)

    def refresh_soon(self, nc: Any) -> None:
        """Read the current value in the background until a read succeeds
        (one loop at a time: a newer call replaces a running one)."""
        if self._retry is not None:
            self._retry.cancel()
        self._retry = asyncio.get_running_loop().create_task(self._refresh_until_read(nc))

    async def _refresh_until_read(self, nc: Any) -> None:
        heard, delay = self.heard, 0.0
        # Not bounded by a count: a sidecar without its table serves nothing
        # right, so it keeps asking (at most every RETRY_MAX) until stopped.
        while True:
            if delay:
                await asyncio.sleep(delay)
            if self.heard != heard or await self.refresh(nc):
                return
            delay = min(self.RETRY_MAX, max(self.RETRY_FIRST, delay * 2))

    async def refresh(self, nc: Any, wait: float = 2.0) -> bool:
        """Read the key's current value (a direct get): True once the server
        answered (a value, or no key yet); False when the read failed (logged,
        never raised)."""
        heard = self.heard
        try:
            msg = await nc.request(self.direct, b"", timeout=wait)
        except Exception as exc:
            logger.warning("route table %s: direct get failed: %s", self.subject, exc)
            return False
        if self.heard != heard:
            # A put arrived meanwhile: as new as what the get read, or newer.
            return True
        hdrs = msg.headers or {}
        if hdrs.get("Status") == "404":
            logger.warning("route table key %s not found; waiting for the operator", self.service)
            return True
        if hdrs.get("Status"):
            logger.warning(
                "route table %s: direct get answered %s %s",
                self.subject,
                hdrs.get("Status"),
                hdrs.get("Description", ""),
            )
            return False
        self._apply(hdrs, msg.data)
        return True

    def _apply(self, hdrs: dict[str, str], data: bytes) -> None:
        deleted = signing.is_delete(hdrs, data)
        key = subjects.routes_key(self.service)
        if self.account is not None and not signing.entry_verified(self.account, key, hdrs, data):
            logger.warning(
                "route table %s: ignored a %s not signed by account %s",
                self.subject,
                "delete" if deleted else "value",
                self.account,
            )
            return
        if deleted:
            logger.warning("route table key %s deleted", self.service)
            self.last = None
            self.on_delete()
            return
        if data == self.last:
            return
        try:
            table = self.parse(data)
        except Exception:
            logger.exception("route table for %s invalid; keeping the previous one", self.service)
            return
        self.last = data
        self.on_table(table)

    async def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._retry
            self._retry = None
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None
