"""The inbound edge: keep-alive HTTP/1.1 connections to the app.

Raw asyncio Protocol connections parsed with httptools, at most ``limit``
requests at once. With an idle connection free a call completes from the
response parser's callback (:meth:`AppPool.send` with an :class:`AppCall`),
otherwise (connecting, a stale connection's retry) in a task
(:meth:`AppPool.request`). A response that outgrows one NATS message streams
(natsmesh_sidecar.transport.stream.callee, imported then).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import httptools

from natsmesh_sidecar.wire import StreamLimits

logger = logging.getLogger(__name__)
MAX_RESPONSE_HEADER_BYTES = 256 * 1024
#: Response headers that delimit the body; without either, the connection's
#: close does.
_FRAMING = frozenset({"content-length", "transfer-encoding"})
#: Response header name as received -> (name, which framing header it is:
#: 0 none, else _LENGTH or _CHUNKED).
_NAMES: dict[bytes, tuple[str, int]] = {}
_LENGTH, _CHUNKED = 1, 2
#: Content-Length values this long (in digits) may be over the inline limit.
_LONG = 7


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
        self.future: asyncio.Future[AppResponse] | AppCall | None = None
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
        self._chunked = False
        self._length = b""
        #: The response may have to stream (chunked, or longer than one
        #: message): decided once the read that brought its head is parsed.
        self._maybe_stream = False
        #: The stream its response became (natsmesh_sidecar.transport.stream.callee.CalleeStream).
        self.stream: Any = None

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
        elif self.stream is not None:
            self.stream.app_lost()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.future is None and self.stream is None:
            # Bytes nobody asked for: the connection is out of step; drop it.
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.reuse = False
            if self.stream is not None:
                self.stream.cut(f"malformed response from app: {exc}")
            elif self.future is not None and not self.future.done():
                self.future.set_exception(AppError(f"malformed response from app: {exc}"))
            self.close()
            return
        if self._maybe_stream:
            self._stream()

    def _stream(self) -> None:
        """A response still incomplete after the read that brought its head
        streams from here on (natsmesh_sidecar.transport.stream.callee)."""
        self._maybe_stream = False
        fut = self.future
        if fut is None or fut.done() or self.transport is None:
            return
        from natsmesh_sidecar.transport.stream import callee

        stream = self.stream = callee.for_response(
            self.pool.stream_limits, self.transport, self.close
        )
        stream.length = None if self._chunked or not self._length else int(self._length)
        for piece in self._body:
            stream.feed(piece)
        # on_body appends to it from now on.
        self._body = cast(list[bytes], stream)
        self.reuse = False
        fut.set_result(
            AppResponse(self.parser.get_status_code(), self._headers, cast(bytes, stream))
        )

    def on_message_begin(self) -> None:
        self._headers = []
        self._body = []
        self._header_bytes = 0
        self._framed = False
        self._chunked = False
        self._length = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_RESPONSE_HEADER_BYTES:
            raise AppError("response headers too large")
        hit = _NAMES.get(name)
        if hit is None:
            n = name.decode("latin-1")
            low = n.lower()
            hit = (
                n,
                0 if low not in _FRAMING else _LENGTH if low == "content-length" else _CHUNKED,
            )
            if len(_NAMES) >= 4096:
                _NAMES.clear()  # names come from the app
            _NAMES[name] = hit
        if hit[1]:
            self._framed = True
            if hit[1] == _LENGTH:
                self._length = value
            else:
                self._chunked = True
        self._headers.append((hit[0], value.decode("latin-1")))

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
        if self._chunked or (
            len(self._length) >= _LONG and int(self._length) > self.pool.inline_max()
        ):
            self._maybe_stream = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.future is not None and not self.future.done():
            self._maybe_stream = False  # complete within one read: no stream
            self._finish()
        elif self.stream is not None:
            self.stream.end()
            self.close()

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

    def __init__(
        self,
        host: str,
        port: int,
        limit: int,
        idle_timeout: float = 4.0,
        *,
        stream_limits: StreamLimits | None = None,
        inline_max: Callable[[], int] = lambda: 1024 * 1024 - 16 * 1024,
    ) -> None:
        self.host = host
        self.port = port
        #: A response longer than this (or chunked across reads) streams.
        self.inline_max = inline_max
        self.stream_limits = stream_limits or StreamLimits()
        #: An app's server closes keep-alive connections it sees idle (Node 5 s,
        #: Go's and uvicorn's 5 s, gunicorn 2 s): we drop ours first, so a reused
        #: connection is rarely one the app is closing at that very moment.
        self.idle_timeout = idle_timeout
        self.idle: collections.deque[_AppConnection] = collections.deque()
        self.limit = limit
        #: Free request slots; a released slot goes to the first waiter.
        self.free = limit
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
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

    def _take_slot(self) -> bool:
        if self.free > 0 and not self._slot_waiters:
            self.free -= 1
            return True
        return False

    def _release(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1

    async def _acquire(self) -> None:
        if self._take_slot():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot just as we were cancelled
            raise

    async def request(
        self, data: bytes, *, head: bool, limit_s: float, retry_stale: bool
    ) -> AppResponse:
        await self._acquire()
        try:
            return await self._request(data, head=head, limit_s=limit_s, retry_stale=retry_stale)
        finally:
            self._release()

    def send(self, data: bytes, head: bool, limit_s: float, call: AppCall) -> bool:
        """:meth:`request` (with ``retry_stale``) without awaiting, for the hot path.

        False, with nothing sent, unless a slot and an idle connection are
        free right now; else ``call.complete`` gets the response or the error
        later (:meth:`AppCall.settle`).
        """
        if self.free > 0 and not self._slot_waiters:  # _take_slot, inlined
            self.free -= 1
        else:
            return False
        conn = self._idle_conn()
        if conn is None:
            self._release()
            return False
        call.pool = self
        call.conn = conn
        call.data = data
        call.head = head
        call.limit_s = limit_s
        _, call.timer = self._send(conn, data, head, limit_s, call)
        return True

    def _idle_conn(self) -> _AppConnection | None:
        now = time.monotonic()
        while self.idle:
            c = self.idle.pop()
            if c.closed:
                continue
            if now - c.idle_since > self.idle_timeout:
                c.close()
                continue
            return c
        return None

    def _send(
        self,
        conn: _AppConnection,
        data: bytes,
        head: bool,
        limit_s: float,
        call: AppCall | None = None,
    ) -> tuple[asyncio.Future[AppResponse] | AppCall, asyncio.TimerHandle]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut = loop.create_future() if call is None else call
        conn.future = fut
        conn.head = head
        conn.received = 0
        assert conn.transport is not None
        conn.transport.write(data)
        # A timer handle, not asyncio.wait_for: no extra task or waiter per call.
        return fut, loop.call_later(limit_s, _expire, fut)

    def _keep(self, conn: _AppConnection) -> None:
        conn.future = None
        if conn.reuse and not conn.closed:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        elif conn.stream is None:
            conn.close()
        # else its response streams: it closes once that is done.

    async def _request(
        self, data: bytes, *, head: bool, limit_s: float, retry_stale: bool
    ) -> AppResponse:
        while True:
            conn = self._idle_conn()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            fut, timer = self._send(conn, data, head, limit_s)
            assert isinstance(fut, asyncio.Future)
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
            self._keep(conn)
            return resp

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


def _expire(fut: asyncio.Future[AppResponse] | AppCall) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class AppCall:
    """An app call on the hot path (:meth:`AppPool.send`), resolved instead of a future.

    ``set_result`` and ``set_exception`` act at once, from the parser
    callback, the timer or ``connection_lost``: no future, no scheduled
    callback and no closures per app call. The pool fills in the connection
    part; :meth:`complete` is the caller's (a subclass's).
    """

    __slots__ = ("conn", "data", "finished", "head", "limit_s", "pool", "timer")

    def __init__(self) -> None:
        self.finished = False
        self.timer: asyncio.TimerHandle | None = None
        self.pool: AppPool
        self.conn: _AppConnection
        self.data = b""
        self.head = False
        self.limit_s = 0.0

    def done(self) -> bool:
        return self.finished

    def _finish(self, result: AppResponse | BaseException) -> None:
        if self.finished:
            return
        self.finished = True
        try:
            self.settle(result)
        except Exception:
            logger.exception("app call completion failed")

    # A future's two setters, one call each.
    set_result = _finish
    set_exception = _finish

    def settle(self, result: AppResponse | BaseException) -> None:
        """The pool's part: the connection back (or closed), the slot freed; then complete."""
        pool, conn = self.pool, self.conn
        if self.timer is not None:
            self.timer.cancel()
        if isinstance(result, AppResponse):
            pool._keep(conn)
            pool._release()
            self.complete(result)
            return
        conn.close()
        if isinstance(result, AppError) and conn.received == 0:
            # Stale, as in _request: try again (a fresh connection if need be).
            retry = asyncio.get_running_loop().create_task(
                pool._request(self.data, head=self.head, limit_s=self.limit_s, retry_stale=True)
            )

            def retried(t: asyncio.Task[AppResponse]) -> None:
                pool._release()
                if not t.cancelled():
                    e = t.exception()
                    self.complete(t.result() if e is None else cast(Exception, e))

            retry.add_done_callback(retried)
            return
        pool._release()
        self.complete(cast(Exception, result))

    def complete(self, result: AppResponse | Exception) -> None:
        raise NotImplementedError
