"""Inbound: NATS requests on the service subject become HTTP calls to the app.

The queue subscription's messages arrive straight from the NATS parser; the
handler only takes a concurrency slot and sends the app request, so slow app
calls never block the subscription (and a full set of slots is natural
back-pressure: messages wait in a bounded backlog). App calls go over a
keep-alive pool of raw asyncio Protocol connections parsed with httptools;
with an idle connection free the call completes from the response parser's
callback, otherwise (connecting, a stale connection's retry) in a task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import httptools

from natsmesh_sidecar import accesslog, codec
from natsmesh_sidecar.metrics import Metrics
from natsmesh_sidecar.wire import StreamLimits

if TYPE_CHECKING:
    from natsmesh_sidecar.natsfast import FastPath
    from natsmesh_sidecar.natsfast import Reply as Msg
    from natsmesh_sidecar.tap import Tap
    from natsmesh_sidecar.tracing import Tracer

logger = logging.getLogger(__name__)

MAX_RESPONSE_HEADER_BYTES = 256 * 1024
#: Messages held while every app slot is busy (what nats-py's pending limit
#: was before); beyond it a request is answered 503 at once.
MAX_BACKLOG = 65536
#: Response headers that delimit the body; without either, the connection's
#: close does.
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
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
        self.future: asyncio.Future[AppResponse] | _Call | None = None
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
        #: The stream its response became (natsmesh_sidecar.stream.callee.CalleeStream).
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
        streams from here on (natsmesh_sidecar.stream.callee)."""
        self._maybe_stream = False
        fut = self.future
        if fut is None or fut.done() or self.transport is None:
            return
        from natsmesh_sidecar.stream import callee

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

    def send(self, data: bytes, head: bool, limit_s: float, call: _Call) -> bool:
        """:meth:`request` (with ``retry_stale``) without awaiting, for the hot path.

        False, with nothing sent, unless a slot and an idle connection are
        free right now; else ``call.complete`` gets the response or the error
        later (:meth:`_Call.settle`).
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
        call: _Call | None = None,
    ) -> tuple[asyncio.Future[AppResponse] | _Call, asyncio.TimerHandle]:
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


def reply_head(lines: str, status: int, error: str) -> bytes:
    """A reply's NATS header block from the app's header lines (:func:`codec.nats_lines`).

    What ``natsfast.encode_headers`` writes for ``http_to_nats(headers)``
    with ``Nm-Status`` and ``Nm-Error`` added: no app header's key is one of
    those (``Nm-`` names are escaped), so they come last.
    """
    tail = f"Nm-Status: {status}\r\n"
    if error:
        tail += f"Nm-Error: {error.translate(_NEWLINES)}\r\n"
    return f"NATS/1.0\r\n{lines}{tail}\r\n".encode()


def _expire(fut: asyncio.Future[AppResponse] | _Call) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class _Call:
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


class _InboundCall(_Call):
    """One message's app call: what answering it needs."""

    __slots__ = ("handler", "method", "msg", "rid", "t0", "target")

    def __init__(
        self, handler: InboundHandler, msg: Msg, t0: float, rid: str, method: str, target: str
    ) -> None:
        super().__init__()
        self.handler = handler
        self.msg = msg
        self.t0 = t0
        self.rid = rid
        self.method = method
        self.target = target

    def complete(self, result: AppResponse | Exception) -> None:
        h, msg, rid = self.handler, self.msg, self.rid
        status, error = 500, ""
        try:
            status, rh, body, error = h._app_result(result, rid)
            h._reply(msg, status, rh, body, error)
        except Exception as exc:
            status, error = 500, error or "internal"
            h._failed(msg, rid, exc)
        h._end(msg, self.t0, rid, self.method, self.target, status, error)
        h._next()


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
        tracer: Tracer | None = None,
        may_stream: Callable[[str], bool] = lambda subject: True,
    ) -> None:
        self.pool = pool
        #: Whether our NATS user may subscribe to a call subject (a stream's).
        self.may_stream = may_stream
        #: Streamed responses being set up (natsmesh_sidecar.stream.callee).
        self.stream_tasks: set[asyncio.Task[None]] = set()
        #: Set only with an OTLP endpoint (natsmesh_sidecar.tracing).
        self.tracer = tracer
        self.limits = limits
        self.metrics = metrics
        self.source = source
        self.version = version
        self.fast = fast
        self.access_log = access_log
        #: natsmesh_sidecar.tap.Tap while someone taps (set by the sidecar), else None.
        self.tap: Tap | None = None
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
        if self.tracer is not None:
            # Before anything renders the message for the app.
            self.tracer.adopt(msg.headers)
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
        rid = msg.headers.get(codec.REQUEST_ID) or codec.new_request_id()
        if self.tracer is not None:
            hdrs = msg.headers
            self._span(
                self.tracer,
                msg,
                0.0,
                rid,
                hdrs.get(codec.H_METHOD, ""),
                hdrs.get(codec.H_TARGET, ""),
                503,
                "overloaded",
            )
        if not msg.reply or fast is None:
            return
        _, rh, body, _ = self._error(503, "overloaded", why, rid)
        rh[codec.H_STATUS] = "503"
        rh[codec.H_ERROR] = "overloaded"
        fast.publish(msg.reply, "", rh, body)

    def _start(self, msg: Msg) -> None:
        self.inflight += 1
        if self._begin(msg):
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = loop.create_task(self._serve(msg))
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _track(self, coro: Coroutine[Any, Any, None], tasks: set[asyncio.Task[None]]) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(self._done if tasks is self.tasks else tasks.discard)

    async def _serve_upload(
        self, msg: Msg, hdrs: dict[str, str], t0: float, rid: str, method: str, target: str
    ) -> None:
        """A request whose body streams (natsmesh_sidecar.stream.callee), or a
        WebSocket upgrade (natsmesh_sidecar.stream.tunnel): done at its answer's head."""
        from natsmesh_sidecar.stream import callee, protocol

        status, error = 500, "internal"
        extra = () if codec.REQUEST_ID in hdrs else ((codec.REQUEST_ID, rid),)
        # What the upload may hold (a window of chunks in flight to the app,
        # one more in its socket's buffer) counts against the byte budget
        # like a body in hand, until the response head. The window is the
        # caller's route's, if it sets one.
        limits = protocol.limits_of(hdrs, self.pool.stream_limits)
        serve, reserve = callee.serve_upload, (limits.window + 1) * limits.chunk_bytes
        if codec.H_UPGRADE in hdrs:
            from natsmesh_sidecar.stream import tunnel

            # Nothing flows until the app's answer.
            serve, reserve = tunnel.serve, 0
        if self.held_bytes and self.held_bytes + reserve > self.limits.max_bytes:
            self._overloaded(msg, "sidecar memory budget for requests in hand is full")
            self.inflight -= 1
            self.held_bytes -= len(msg.data)
            return
        self.held_bytes += reserve

        def head(length: int | None) -> bytes | None:
            return codec.render_request_head_from_nats(
                method, target, hdrs, extra, self.app_host, length
            )

        try:
            fast = self.fast()
            if fast is None:
                status, error = 503, "nats_unavailable"
                return
            status, error = await serve(
                msg,
                head,
                fast=fast,
                limits=limits,
                app_host=self.pool.host,
                app_port=self.pool.port,
                may_subscribe=self.may_stream,
                timeout_s=self.timeout_of(hdrs),
            )
        except Exception as exc:
            self._failed(msg, rid, exc)
        finally:
            self.held_bytes -= reserve
            self._end(msg, t0, rid, method, target, status, error)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._next()

    def _next(self) -> None:
        if self.backlog and self.inflight < self.limit:
            self._start(self.backlog.popleft())

    def _begin(self, msg: Msg) -> bool:
        """The common case without a task: a valid request, an idle app connection.

        False, with nothing done, for everything else (:meth:`_serve` then).
        """
        t0 = time.perf_counter()
        hdrs = msg.headers
        method = hdrs.get(codec.H_METHOD, "")
        target = hdrs.get(codec.H_TARGET, "")
        if not method or not target:
            method = hdrs.get(codec.H_STREAM_METHOD, "")
            if method and target and codec.H_STREAM in hdrs:
                # A request whose body streams (natsmesh_sidecar.stream).
                rid = hdrs.get(codec.REQUEST_ID) or codec.new_request_id()
                self._track(self._serve_upload(msg, hdrs, t0, rid, method, target), self.tasks)
                return True
            return False
        rid = hdrs.get(codec.REQUEST_ID) or codec.new_request_id()
        data = self._render(msg, hdrs, rid, method, target)
        if data is None:
            return False

        call = _InboundCall(self, msg, t0, rid, method, target)
        return self.pool.send(data, method == "HEAD", self.timeout_of(hdrs), call)

    def pending(self) -> int:
        return self.inflight + len(self.backlog)

    async def _serve(self, msg: Msg) -> None:
        t0 = time.perf_counter()
        hdrs = msg.headers or {}
        rid = hdrs.get(codec.REQUEST_ID) or codec.new_request_id()
        method = hdrs.get(codec.H_METHOD, "")
        target = hdrs.get(codec.H_TARGET, "")
        status = 500
        error = ""
        try:
            status, rh, body, error = await self._call_app(msg, hdrs, rid, method, target)
            self._reply(msg, status, rh, body, error)
        except Exception as exc:
            error = error or "internal"
            status = 500
            self._failed(msg, rid, exc)
        finally:
            self._end(msg, t0, rid, method, target, status, error)

    def _reply(
        self, msg: Msg, status: int, rh: dict[str, str] | str, body: bytes, error: str
    ) -> None:
        """Answer the caller: ``rh`` is a header dict, or the app's header lines
        (:func:`codec.nats_lines`: no key of theirs is a mesh header)."""
        if msg.reply:
            fast = self.fast()
            if fast is None:
                return
            if isinstance(rh, str):
                if body.__class__ is not bytes:
                    self._stream_reply(fast, msg, status, rh, body)
                    return
                fast.publish_block(msg.reply.encode(), b"", reply_head(rh, status, error), body)
                return
            rh[codec.H_STATUS] = str(status)
            if error:
                rh[codec.H_ERROR] = error
            fast.publish(msg.reply, "", rh, body)

    def _stream_reply(
        self, fast: FastPath, msg: Msg, status: int, lines: str, body: object
    ) -> None:
        """The app's response streams (inbound's connection made ``body`` a CalleeStream)."""
        from natsmesh_sidecar.stream import callee

        stream = cast(callee.CalleeStream, body)
        self._track(
            callee.begin_response(
                stream,
                fast,
                msg,
                status,
                lines,
                stream.length,
                self.may_stream,
                self.pool.inline_max(),
            ),
            self.stream_tasks,
        )

    def _failed(self, msg: Msg, rid: str, exc: Exception) -> None:
        logger.error("inbound request failed", exc_info=exc)
        self.last_error = f"{type(exc).__name__}: {exc}"
        fast = self.fast()
        if msg.reply and fast is not None:
            # Never leave the caller waiting out its timeout for a bug here.
            _, rh, body, _ = self._error(500, "internal", "sidecar error", rid)
            rh[codec.H_STATUS] = "500"
            rh[codec.H_ERROR] = "internal"
            with contextlib.suppress(Exception):
                fast.publish(msg.reply, "", rh, body)

    def _end(
        self, msg: Msg, t0: float, rid: str, method: str, target: str, status: int, error: str
    ) -> None:
        """Count and log a finished call, free its slot."""
        self.inflight -= 1
        self.held_bytes -= len(msg.data)
        elapsed = time.perf_counter() - t0
        self.served += 1
        self.processing_ns += int(elapsed * 1e9)
        if status >= 500:
            self.errors += 1
        source = msg.headers.get(codec.H_SOURCE, "-") if msg.headers else "-"
        self.metrics.observe("inbound", source, self.source, status, elapsed)
        if self.tracer is not None:
            self._span(self.tracer, msg, elapsed, rid, method, target, status, error)
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
        tap = self.tap
        if tap is not None:
            tap.request(
                direction="inbound",
                method=method,
                path=target,
                status=status,
                duration_s=elapsed,
                source=source,
                destination=self.source,
                request_id=rid,
                route=self.version,
                error=error,
            )

    def _span(
        self,
        tracer: Tracer,
        msg: Msg,
        seconds: float,
        rid: str,
        method: str,
        target: str,
        status: int,
        error: str,
    ) -> None:
        tracer.inbound(
            msg.headers,
            seconds,
            method=method,
            # The path only: a query string may carry what a trace store must not keep.
            path=target.split("?", 1)[0],
            caller=msg.headers.get(codec.H_SOURCE, "-"),
            status=status,
            error=error,
            version=self.version,
            request_id=rid,
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
    ) -> tuple[int, dict[str, str] | str, bytes, str]:
        """(status, reply NATS headers, body, error code)."""
        if not method or not target:
            return self._error(400, "bad_request", "message lacks Nm-Method/Nm-Target", rid)
        data = self._render(msg, hdrs, rid, method, target)
        if data is None:
            return self._error(400, "bad_request", "invalid method or target", rid)
        try:
            resp: AppResponse | Exception = await self.pool.request(
                data, head=method == "HEAD", limit_s=self.timeout_of(hdrs), retry_stale=True
            )
        except (TimeoutError, AppError) as exc:
            resp = exc
        return self._app_result(resp, rid)

    def _render(
        self, msg: Msg, hdrs: dict[str, str], rid: str, method: str, target: str
    ) -> bytes | None:
        extra = () if codec.REQUEST_ID in hdrs else ((codec.REQUEST_ID, rid),)
        return codec.render_request_from_nats(method, target, hdrs, extra, msg.data, self.app_host)

    def _app_result(
        self, resp: AppResponse | Exception, rid: str
    ) -> tuple[int, dict[str, str] | str, bytes, str]:
        """The app's answer (or the error calling it) as (status, headers, body, error code)."""
        if isinstance(resp, TimeoutError):
            return self._error(504, "app_timeout", "the app did not answer in time", rid)
        if isinstance(resp, AppError):
            self.last_error = str(resp)
            if self.app_failed is not None:
                self.app_failed()
            failed = self._error(502, "app_unreachable", str(resp), rid)
            if isinstance(resp, AppRefused):
                # Nothing reached the app: the caller may try another replica.
                failed[1][codec.H_UNDELIVERED] = "1"
            return failed
        if isinstance(resp, Exception):
            raise resp
        if codec.final_status(resp.status) is None:
            self.last_error = f"app answered status {resp.status}"
            return self._error(502, "app_bad_status", f"the app answered {resp.status}", rid)
        # The NATS header lines, not a dict: _reply writes them as they are.
        return resp.status, codec.nats_lines(resp.headers), resp.body, ""

    def _error(
        self, status: int, code: str, message: str, rid: str
    ) -> tuple[int, dict[str, str], bytes, str]:
        return (
            status,
            {"content-type": "application/json", codec.REQUEST_ID: rid},
            codec.error_body(code, message, rid),
            code,
        )
