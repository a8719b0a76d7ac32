"""Inbound: NATS requests on the service subject become HTTP calls to the app.

The queue subscription uses a callback; the callback only takes a concurrency
slot and starts a task, so slow app calls never block the subscription (and a
full set of slots is natural back-pressure: nats-py buffers, then the server
would see a slow consumer). App calls go over a keep-alive pool of raw asyncio
Protocol connections parsed with httptools.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import httptools

from natsmesh_sidecar import accesslog, codec
from natsmesh_sidecar.metrics import Metrics

if TYPE_CHECKING:
    from natsmesh_sidecar.natsfast import FastPath
    from natsmesh_sidecar.natsfast import Reply as Msg

logger = logging.getLogger(__name__)

MAX_RESPONSE_HEADER_BYTES = 256 * 1024
#: Messages held while every app slot is busy (what nats-py's pending limit
#: was before); beyond it a request is answered 503 at once.
MAX_BACKLOG = 65536
#: Response headers that delimit the body; without either, the connection's
#: close does.
_FRAMING = frozenset({"content-length", "transfer-encoding"})


class AppError(Exception):
    """The app could not be reached or answered garbage (a 502)."""


class AppRefused(AppError):
    """The app did not accept a connection: nothing of the request was sent."""


class AppResponse:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _AppConnection(asyncio.Protocol):
    """One keep-alive connection to the app; one request at a time."""

    def __init__(self, pool: AppPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.future: asyncio.Future[AppResponse] | None = None
        self.closed = False
        self.head = False
        self.received = 0
        self.reuse = True
        self.idle_since = 0.0
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._header_bytes = 0
        self._framed = False
        self._complete_on_close = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        fut = self.future
        if fut is not None and not fut.done():
            if self._complete_on_close:
                # A response delimited by the connection closing.
                self._finish()
            else:
                fut.set_exception(AppError("app closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.future is None:
            # Bytes nobody asked for: the connection is out of step; drop it.
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.reuse = False
            if not self.future.done():
                self.future.set_exception(AppError(f"malformed response from app: {exc}"))
            self.close()

    def on_message_begin(self) -> None:
        self._headers = []
        self._body = []
        self._header_bytes = 0
        self._framed = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_RESPONSE_HEADER_BYTES:
            raise AppError("response headers too large")
        n = name.decode("latin-1")
        if not self._framed and n.lower() in _FRAMING:
            self._framed = True
        self._headers.append((n, value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if self.head or status in (204, 304) or 100 <= status < 200:
            if 100 <= status < 200:
                # Interim response (100 Continue): wait for the real one.
                return
            self._finish()
            # llhttp does not know the request was HEAD; a fresh parser makes
            # sure it does not wait for a body the app will never send.
            self.parser = httptools.HttpResponseParser(self)
            return
        self._complete_on_close = not self._framed

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.future is not None and not self.future.done():
            self._finish()

    def _finish(self) -> None:
        fut = self.future
        if fut is None or fut.done():
            return
        if not self.parser.should_keep_alive() or self._complete_on_close:
            self.reuse = False
        status = self.parser.get_status_code()
        fut.set_result(AppResponse(status, self._headers, b"".join(self._body)))

    def close(self) -> None:
        self.reuse = False
        if self.transport is not None and not self.closed:
            self.transport.close()


class AppPool:
    """Keep-alive connections to the app, at most ``limit`` requests at once."""

    def __init__(self, host: str, port: int, limit: int, idle_timeout: float = 4.0) -> None:
        self.host = host
        self.port = port
        #: An app's server closes keep-alive connections it sees idle (Node 5 s,
        #: Go's and uvicorn's 5 s, gunicorn 2 s): we drop ours first, so a reused
        #: connection is rarely one the app is closing at that very moment.
        self.idle_timeout = idle_timeout
        self.idle: collections.deque[_AppConnection] = collections.deque()
        self.slots = asyncio.Semaphore(limit)
        self.limit = limit
        #: Cached: get_running_loop() is a getpid() system call on Python 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _connect(self) -> _AppConnection:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_connection(
                lambda: _AppConnection(self), self.host, self.port
            )
        except OSError as exc:
            raise AppRefused(
                f"app unreachable at {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        return proto

    async def request(
        self, data: bytes, *, head: bool, limit_s: float, retry_stale: bool
    ) -> AppResponse:
        async with self.slots:
            return await self._request(data, head=head, limit_s=limit_s, retry_stale=retry_stale)

    async def _request(
        self, data: bytes, *, head: bool, limit_s: float, retry_stale: bool
    ) -> AppResponse:
        while True:
            reused = False
            conn: _AppConnection | None = None
            now = time.monotonic()
            while self.idle:
                c = self.idle.pop()
                if c.closed:
                    continue
                if now - c.idle_since > self.idle_timeout:
                    c.close()
                    continue
                conn, reused = c, True
                break
            if conn is None:
                conn = await self._connect()
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            fut: asyncio.Future[AppResponse] = loop.create_future()
            conn.future = fut
            conn.head = head
            conn.received = 0
            assert conn.transport is not None
            conn.transport.write(data)
            # A timer handle, not asyncio.wait_for: no extra task or waiter per call.
            timer = loop.call_later(limit_s, _expire, fut)
            try:
                resp = await fut
            except TimeoutError:
                conn.close()
                raise
            except AppError:
                conn.close()
                # The app may close an idle keep-alive connection just as we reuse
                # it: nothing was answered, so one fresh try is safe.
                if reused and conn.received == 0 and retry_stale:
                    continue
                raise
            finally:
                timer.cancel()
            conn.future = None
            if conn.reuse and not conn.closed:
                conn.idle_since = time.monotonic()
                self.idle.append(conn)
            else:
                conn.close()
            return resp

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


def _expire(fut: asyncio.Future[AppResponse]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


@dataclass(frozen=True)
class InboundLimits:
    """The callee's own policy over what callers may make it hold and wait for."""

    max_inflight: int
    """Concurrent calls into the app."""
    max_bytes: int
    """Request bytes held at once (backlog plus calls in flight)."""
    max_timeout_s: float
    """Ceiling on a caller's ``Nm-Timeout-Ms``; also the default without one."""


class InboundHandler:
    """The queue-subscription callback and the per-message app call.

    Takes what it uses, not the sidecar: the pool, the metrics, its own
    identity for labels and logs, and a getter for the current fast path
    (it changes on reconnect).
    """

    def __init__(
        self,
        pool: AppPool,
        *,
        limits: InboundLimits,
        metrics: Metrics,
        source: str,
        version: str,
        app_host: str,
        fast: Callable[[], FastPath | None],
        access_log: bool = True,
        app_failed: Callable[[], None] | None = None,
    ) -> None:
        self.pool = pool
        self.limits = limits
        self.metrics = metrics
        self.source = source
        self.version = version
        self.fast = fast
        self.access_log = access_log
        #: Told when the app refused or dropped a call (a readiness check now).
        self.app_failed = app_failed
        self.inflight = 0
        self.served = 0
        self.errors = 0
        self.last_error = ""
        self.processing_ns = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.app_host = app_host
        self.limit = limits.max_inflight
        #: Messages taken from NATS while every slot was busy, served in order.
        self.backlog: collections.deque[Msg] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Payload bytes of the backlog and of the calls in flight.
        self.held_bytes = 0

    def on_msg(self, msg: Msg) -> None:
        """Called straight from the NATS parser: start the app call, never block.

        At ``max_inflight`` calls the message waits in :attr:`backlog`; a
        finishing call starts the next one. Past the byte budget (or the
        backlog length) it is answered 503 at once; one message is always
        admitted when nothing is held, so a budget below max_payload cannot
        starve the service.
        """
        size = len(msg.data)
        if self.held_bytes and self.held_bytes + size > self.limits.max_bytes:
            self._overloaded(msg, "sidecar memory budget for requests in hand is full")
            return
        if self.inflight >= self.limit:
            if len(self.backlog) >= MAX_BACKLOG:
                self._overloaded(msg, "sidecar backlog full")
                return
            self.held_bytes += size
            self.backlog.append(msg)
            return
        self.held_bytes += size
        self._start(msg)

    def _overloaded(self, msg: Msg, why: str) -> None:
        fast = self.fast()
        self.errors += 1
        self.last_error = "overloaded"
        # Counted under "-": the source of a refused message is not worth a series.
        self.metrics.observe("inbound", "-", self.source, 503, 0.0)
        if not msg.reply or fast is None:
            return
        rid = msg.headers.get(codec.REQUEST_ID) or codec.new_request_id()
        _, rh, body, _ = self._error(503, "overloaded", why, rid)
        rh[codec.H_STATUS] = "503"
        rh[codec.H_ERROR] = "overloaded"
        fast.publish(msg.reply, "", rh, body)

    def _start(self, msg: Msg) -> None:
        self.inflight += 1
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = loop.create_task(self._serve(msg))
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self.backlog and self.inflight < self.limit:
            self._start(self.backlog.popleft())

    def pending(self) -> int:
        return self.inflight + len(self.backlog)

    async def _serve(self, msg: Msg) -> None:
        t0 = time.perf_counter()
        hdrs = msg.headers or {}
        rid = hdrs.get(codec.REQUEST_ID) or codec.new_request_id()
        source = hdrs.get(codec.H_SOURCE, "-")
        method = hdrs.get(codec.H_METHOD, "")
        target = hdrs.get(codec.H_TARGET, "")
        status = 500
        error = ""
        try:
            status, rh, body, error = await self._call_app(msg, hdrs, rid, method, target)
            if msg.reply:
                rh[codec.H_STATUS] = str(status)
                if error:
                    rh[codec.H_ERROR] = error
                fast = self.fast()
                if fast is not None:
                    fast.publish(msg.reply, "", rh, body)
        except Exception as exc:
            error = error or "internal"
            status = 500
            logger.exception("inbound request failed")
            self.last_error = f"{type(exc).__name__}: {exc}"
            fast = self.fast()
            if msg.reply and fast is not None:
                # Never leave the caller waiting out its timeout for a bug here.
                _, rh, body, _ = self._error(500, "internal", "sidecar error", rid)
                rh[codec.H_STATUS] = "500"
                rh[codec.H_ERROR] = "internal"
                with contextlib.suppress(Exception):
                    fast.publish(msg.reply, "", rh, body)
        finally:
            self.inflight -= 1
            self.held_bytes -= len(msg.data)
            elapsed = time.perf_counter() - t0
            self.served += 1
            self.processing_ns += int(elapsed * 1e9)
            if status >= 500:
                self.errors += 1
            self.metrics.observe("inbound", source, self.source, status, elapsed)
            if self.access_log:
                accesslog.log(
                    request_id=rid,
                    direction="inbound",
                    source=source,
                    destination=self.source,
                    route=self.version,
                    method=method,
                    path=target.split("?", 1)[0],
                    status=status,
                    duration_s=elapsed,
                    error=error,
                )

    def timeout_of(self, hdrs: Mapping[str, str]) -> float:
        """The caller's ``Nm-Timeout-Ms`` in seconds, clamped to this callee's ceiling."""
        ceiling = self.limits.max_timeout_s
        try:
            asked = int(hdrs.get(codec.H_TIMEOUT, "0")) / 1000.0
        except ValueError:
            return ceiling
        return ceiling if asked <= 0 else min(asked, ceiling)

    async def _call_app(
        self, msg: Msg, hdrs: dict[str, str], rid: str, method: str, target: str
    ) -> tuple[int, dict[str, str], bytes, str]:
        """(status, reply NATS headers, body, error code)."""
        if not method or not target:
            return self._error(400, "bad_request", "message lacks Nm-Method/Nm-Target", rid)
        headers = codec.nats_to_http(hdrs)
        if codec.REQUEST_ID not in hdrs:
            headers.append((codec.REQUEST_ID, rid))
        data = codec.render_request(method, target, headers, msg.data, self.app_host)
        if data is None:
            return self._error(400, "bad_request", "invalid method or target", rid)
        try:
            resp = await self.pool.request(
                data, head=method == "HEAD", limit_s=self.timeout_of(hdrs), retry_stale=True
            )
        except TimeoutError:
            return self._error(504, "app_timeout", "the app did not answer in time", rid)
        except AppError as exc:
            self.last_error = str(exc)
            if self.app_failed is not None:
                self.app_failed()
            failed = self._error(502, "app_unreachable", str(exc), rid)
            if isinstance(exc, AppRefused):
                # Nothing reached the app: the caller may try another replica.
                failed[1][codec.H_UNDELIVERED] = "1"
            return failed
        if codec.final_status(resp.status) is None:
            self.last_error = f"app answered status {resp.status}"
            return self._error(502, "app_bad_status", f"the app answered {resp.status}", rid)
        out = codec.http_to_nats(resp.headers)
        return resp.status, out, resp.body, ""

    def _error(
        self, status: int, code: str, message: str, rid: str
    ) -> tuple[int, dict[str, str], bytes, str]:
        return (
            status,
            {"content-type": "application/json", codec.REQUEST_ID: rid},
            codec.error_body(code, message, rid),
            code,
        )
