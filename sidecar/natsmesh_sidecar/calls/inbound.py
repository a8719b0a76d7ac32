"""Inbound: NATS requests on the service subject become HTTP calls to the app.

The queue subscription's messages arrive straight from the NATS parser; the
handler only takes a concurrency slot and sends the app request, so slow app
calls never block the subscription (and a full set of slots is natural
back-pressure: messages wait in a bounded backlog). The app calls themselves
go through the edge's pool (natsmesh_sidecar.edge.appclient).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from natsmesh_sidecar import codec
from natsmesh_sidecar.edge.appclient import AppCall, AppError, AppPool, AppRefused, AppResponse
from natsmesh_sidecar.observe import accesslog
from natsmesh_sidecar.observe.metrics import Metrics
from natsmesh_sidecar.transport.budget import Budget

if TYPE_CHECKING:
    from natsmesh_sidecar.edge.h2app import AppH2
    from natsmesh_sidecar.observe.tap import Tap
    from natsmesh_sidecar.observe.tracing import Tracer
    from natsmesh_sidecar.transport.natsfast import FastPath
    from natsmesh_sidecar.transport.natsfast import Reply as Msg

logger = logging.getLogger(__name__)

#: Messages held while every app slot is busy (what nats-py's pending limit
#: was before); beyond it a request is answered 503 at once.
MAX_BACKLOG = 65536
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


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


class _InboundCall(AppCall):
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
    """Request bytes held at once (backlog, calls in flight, streamed bodies'
    holds: natsmesh_sidecar.transport.budget)."""
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
        app_protocol: str = "http",
    ) -> None:
        self.pool = pool
        #: ``grpc``: streamed calls reach the app over HTTP/2 (natsmesh_sidecar.edge.h2app).
        self.app_protocol = app_protocol
        self._app_h2: AppH2 | None = None
        #: Whether our NATS user may subscribe to a call subject (a stream's).
        self.may_stream = may_stream
        #: Streamed responses being set up (natsmesh_sidecar.transport.stream.callee).
        self.stream_tasks: set[asyncio.Task[None]] = set()
        #: Set only with an OTLP endpoint (natsmesh_sidecar.observe.tracing).
        self.tracer = tracer
        self.limits = limits
        self.metrics = metrics
        self.source = source
        self.version = version
        self.fast = fast
        self.access_log = access_log
        #: natsmesh_sidecar.observe.tap.Tap while someone taps (set by the sidecar), else None.
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
        #: Payload bytes of the backlog and of the calls in flight, and what
        #: streamed bodies hold.
        self.budget = Budget(limits.max_bytes)

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
        budget = self.budget
        if budget.used and budget.used + size > budget.capacity:
            self._overloaded(msg, "sidecar memory budget for requests in hand is full")
            return
        if self.inflight >= self.limit:
            if len(self.backlog) >= MAX_BACKLOG:
                self._overloaded(msg, "sidecar backlog full")
                return
            budget.used += size
            self.backlog.append(msg)
            return
        budget.used += size
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
        """A request whose body streams (natsmesh_sidecar.transport.stream.callee), or a
        WebSocket upgrade (natsmesh_sidecar.transport.stream.tunnel): done at its answer's head."""
        from natsmesh_sidecar.transport.stream import callee, protocol

        status, error = 500, "internal"
        extra = () if codec.REQUEST_ID in hdrs else ((codec.REQUEST_ID, rid),)
        # The window is the caller's route's, if it sets one.
        limits = protocol.limits_of(hdrs, self.pool.stream_limits)
        grpc: _GrpcEnd | None = None
        hold = None
        if codec.H_UPGRADE in hdrs:
            from natsmesh_sidecar.transport.stream import tunnel

            # Nothing flows until the app's answer.
            serve: Callable[..., Awaitable[tuple[int, str]]] = tunnel.serve
        else:
            # The body's first chunk must fit the byte budget; the rest is
            # credit its receiver grants as the budget allows (transport.budget).
            hold = self.budget.hold(limits.chunk_bytes)
            if hold is None:
                self._overloaded(msg, "sidecar memory budget for requests in hand is full")
                self._release(msg)
                return
            serve = functools.partial(callee.serve_upload, hold=hold)
            if self.app_protocol == "grpc":
                # Counted at the call's end, with its gRPC status (maybe after this returns).
                grpc = _GrpcEnd(lambda got: self._observe(msg, t0, rid, method, target, *got))
                serve = functools.partial(self._h2_app().serve, on_end=grpc.ended, hold=hold)

        def head(length: int | None) -> bytes | None:
            return codec.render_request_head_from_nats(
                method, target, hdrs, extra, self.app_host, length
            )

        try:
            fast = self.fast()
            if fast is None:
                status, error = 503, "nats_unavailable"
                if grpc is not None:
                    grpc.ended(14)  # UNAVAILABLE, as the caller's sidecar tells its client
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
            if hold is not None and not hold.adopted:
                hold.close()  # no body streamed: refused, or the app unreachable
            if grpc is None:
                self._end(msg, t0, rid, method, target, status, error)
            else:
                self._release(msg)
                grpc.answered(status, error)

    def _h2_app(self) -> AppH2:
        """The app's HTTP/2 connection (made at the first gRPC call)."""
        if self._app_h2 is None:
            from natsmesh_sidecar.edge.h2app import AppH2

            self._app_h2 = AppH2(self.pool.host, self.pool.port, self.app_host)
        return self._app_h2

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
                # A request whose body streams (natsmesh_sidecar.transport.stream).
                rid = hdrs.get(codec.REQUEST_ID) or codec.new_request_id()
                self._track(self._serve_upload(msg, hdrs, t0, rid, method, target), self.tasks)
                return True
            return False
        if self.app_protocol == "grpc":
            return False  # refused in _call_app: the app speaks HTTP/2 only
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
        from natsmesh_sidecar.transport.stream import callee

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
        self._release(msg)
        self._observe(msg, t0, rid, method, target, status, error)

    def _release(self, msg: Msg) -> None:
        """Free a call's slot and what its request held."""
        self.inflight -= 1
        self.budget.used -= len(msg.data)

    def _observe(
        self,
        msg: Msg,
        t0: float,
        rid: str,
        method: str,
        target: str,
        status: int,
        error: str,
        grpc_status: str = "",
    ) -> None:
        """Count, trace and log a finished call (``grpc_status``: a gRPC call's)."""
        elapsed = time.perf_counter() - t0
        self.served += 1
        self.processing_ns += int(elapsed * 1e9)
        if status >= 500:
            self.errors += 1
        source = msg.headers.get(codec.H_SOURCE, "-") if msg.headers else "-"
        self.metrics.observe("inbound", source, self.source, status, elapsed, grpc_status)
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
                grpc_status=grpc_status,
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
        if self.app_protocol == "grpc":
            # A gRPC call always arrives as a stream (natsmesh_sidecar.edge.h2);
            # a unary message is an HTTP/1.1 caller, and a gRPC server
            # answers HTTP/1.1 with a dropped connection: a 502 that would
            # count against the callee. Refused here, the caller's mistake.
            return self._error(
                415,
                "grpc_only",
                f"{self.source} serves gRPC over HTTP/2 only: call it with a gRPC client"
                " (HTTP/2 cleartext to your sidecar's outbound port)",
                rid,
            )
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


class _GrpcEnd:
    """A gRPC call's count, once both its head's answer (HTTP status, error
    code) and its end (its gRPC status, natsmesh_sidecar.edge.h2app) are known:
    the end may come first (a call refused at once) or long after (a stream)."""

    __slots__ = ("code", "head", "observe")

    def __init__(self, observe: Callable[[tuple[int, str, str]], None]) -> None:
        self.observe = observe
        self.head: tuple[int, str] | None = None
        self.code: int | None = None

    def ended(self, code: int) -> None:
        if self.code is None:
            self.code = code
            self._maybe()

    def answered(self, status: int, error: str) -> None:
        self.head = (status, error)
        if self.code is None and status == 500 and error == "internal":
            self.code = 13  # the sidecar failed (logged): nothing else will end it
        self._maybe()

    def _maybe(self) -> None:
        head, code = self.head, self.code
        if head is not None and code is not None:
            self.head = None
            self.observe((head[0], head[1], str(code)))
