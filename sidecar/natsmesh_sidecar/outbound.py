"""Outbound: the app's HTTP calls on 127.0.0.1:15001 become NATS requests.

:class:`OutboundConnection` is a raw asyncio Protocol fed to httptools: no
framework, and no per-request task: a request waiting on NATS is answered
from the reply's callback (a task only for retries, fault delays, policy
fetches and events).
Pipelined requests queue per connection and are answered strictly in order.
Untrusted input is bounded: URL and header bytes, and a header deadline
against slowloris clients (408). A body that outgrows one NATS message
streams (natsmesh_sidecar.stream, imported then): the request is started
with what arrived and the rest follows as the client sends it. An
``Upgrade: websocket`` is routed the same way and, once the callee's app
switched protocols, tunnelled (natsmesh_sidecar.stream.tunnel).

:class:`OutboundHandler` turns one parsed request into a response: resolve the
host in the route table, check the sidecar's own publish permissions, apply the
rule's circuit breaker, faults, timeout and retries, and map the reply back.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, cast

import httptools

from natsmesh_sidecar import accesslog, codec, resilience
from natsmesh_sidecar.natsfast import Reply
from natsmesh_sidecar.table import FORBIDDEN, FOUND, UNKNOWN
from natsmesh_sidecar.targets import MISS
from natsmesh_sidecar.wire import Destination, Rule, StreamLimits, Target

if TYPE_CHECKING:
    from natsmesh_sidecar.app import Sidecar
    from natsmesh_sidecar.stream.caller import CallerStream
    from natsmesh_sidecar.tracing import Tracer

logger = logging.getLogger(__name__)
R = TypeVar("R", bound="Request")

MAX_URL = 8192
EVENTS_PREFIX = "/_events/"
_EVENTS_PREFIX_B = EVENTS_PREFIX.encode()
#: Headers the handler needs by name; everything else is only forwarded.
_SPECIAL = frozenset(
    {
        "host",
        "x-request-id",
        "traceparent",
        "idempotency-key",
        "content-type",
        # Never forwarded: a streamed body's length travels as Nm-Length, and
        # the listener answers 100 Continue itself.
        "content-length",
        "expect",
        # Kept aside, never forwarded: which protocol an Upgrade asks for.
        "upgrade",
    }
)
_DROP = codec.HOP_BY_HOP | {"x-request-id", "traceparent"}
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
#: What on_header does with a header: forward it, keep it aside (the host
#: both), or drop it.
_FORWARD, _SPECIAL_ONLY, _HOST, _DROPPED = 0, 1, 2, 3
#: Header name as received -> (name, lower-case name, what to do): the same
#: few names come with every request. Bounded: names come from clients.
_NAMES: dict[bytes, tuple[str, str, int]] = {}


def _name(name: bytes) -> tuple[str, str, int]:
    n = name.decode("latin-1")
    low = n.lower()
    if low in _SPECIAL:
        kind = _HOST if low == "host" else _SPECIAL_ONLY
    elif low in _DROP or low.startswith(codec.MESH_PREFIX_LOWER):
        kind = _DROPPED
    else:
        kind = _FORWARD
    if len(_NAMES) >= 4096:
        _NAMES.clear()
    found = _NAMES[name] = (n, low, kind)
    return found


class Request:
    __slots__ = (
        "body",
        "headers",
        "host",
        "keep_alive",
        "method",
        "path",
        "special",
        "target",
        "traceparent",
    )

    def __init__(
        self,
        method: str,
        target: str,
        host: str,
        headers: list[tuple[str, str]],
        special: dict[str, str],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.path = target.split("?", 1)[0]
        self.host = host
        self.headers = headers
        self.special = special
        self.body = body
        self.keep_alive = keep_alive
        #: The traceparent sent on (the outbound span's, when tracing).
        self.traceparent: str | None = None

    def lower_headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers} | self.special


class StreamedRequest(Request):
    """A request whose body is still arriving: ``stream`` carries it (and its answer)."""

    __slots__ = ("stream",)

    stream: CallerStream  # or a WebSocket's natsmesh_sidecar.stream.tunnel.CallerTunnel


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing with an HTTP error."""


class OutboundConnection(asyncio.Protocol):
    """One client connection; keep-alive and pipelining-safe."""

    def __init__(self, server: OutboundServer) -> None:
        self.server = server
        self.handler = server.handler
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[Request | bytes] = collections.deque()
        self.busy = False
        self.closed = False
        self.stopped = False
        self.paused = False
        self.eof = False
        self.in_headers = False
        #: Between on_message_begin and on_message_complete: only then can a
        #: client be "slow"; a completed request's body must never count.
        self.in_message = False
        self.started = 0.0
        self.last = 0.0
        self.reject: tuple[int, str, str] | None = None
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._special: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_len = 0
        #: What the handler calls back with a later response (bound once).
        self._resume_cb = self._resume
        #: The stream this connection's client is sending to or reading from
        #: (natsmesh_sidecar.stream.caller.CallerStream), told of the socket's state.
        self.stream: Any = None
        #: The stream of the request whose body is arriving now.
        self._upload: Any = None

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self.last = self.started = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.stream is not None:
            self.stream.client_lost()

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.stream.writable(False)

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.stream.writable(True)

    def eof_received(self) -> bool | None:
        # A half-closing client (shutdown(SHUT_WR)) still wants its answers:
        # keep the transport open until the queued requests are answered.
        self.eof = True
        if self.busy or self.queue:
            return True
        return None

    def data_received(self, data: bytes) -> None:
        if self.stopped:
            return
        self.last = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[exc.args[0] :])
        except httptools.HttpParserCallbackError:
            status, code, message = self.reject or (400, "bad_request", "malformed HTTP request")
            self._fail(status, code, message)
        except httptools.HttpParserError as exc:
            self._fail(400, "bad_request", f"malformed HTTP request: {exc}")

    # -- httptools callbacks -----------------------------------------------

    def on_message_begin(self) -> None:
        self.in_headers = True
        self.in_message = True
        # data_received set ``last`` just before feeding the parser.
        self.started = self.last
        self._url = b""
        self._headers = []
        self._special = {}
        self._header_bytes = 0
        self._body = []
        self._body_len = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL:
            self.reject = (414, "uri_too_long", "request target too long")
            raise _Reject

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.server.max_header_bytes:
            self.reject = (431, "headers_too_large", "request headers too large")
            raise _Reject
        hit = _NAMES.get(name)
        if hit is None:
            hit = _name(name)
        n, low, kind = hit
        if kind == _FORWARD:
            self._headers.append((n, value.decode("latin-1")))
        elif kind != _DROPPED:
            v = value.decode("latin-1")
            self._special[low] = v
            if kind == _HOST:
                self._headers.append((n, v))

    def on_headers_complete(self) -> None:
        self.in_headers = False
        if "expect" in self._special and not self.busy and self.transport is not None:
            # The body is ours to take (and to stream): no need to ask the callee.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self.handler.app.max_body():
            self._stream_body(body)
            return
        self._body.append(body)

    def _stream_body(self, body: bytes) -> None:
        """A body past one message: start its request now, stream the rest."""
        upload = self._upload
        if upload is None:
            if self.stopped or self.transport is None:
                return
            if self._url.startswith(_EVENTS_PREFIX_B):
                # An event is one JetStream message: it cannot stream.
                self.reject = (413, "payload_too_large", "event body exceeds the NATS max_payload")
                raise _Reject
            from natsmesh_sidecar.stream.caller import CallerStream

            length = self._special.get("content-length", "")
            upload = self._upload = CallerStream.for_upload(
                self.handler.stream_limits,
                self.transport,
                keep_alive=self.parser.should_keep_alive(),
                length=int(length) if length.isdigit() else None,
            )
            if self.stream is None:
                self.stream = upload  # told if the client goes away mid-body
            req = self._request(StreamedRequest, b"")
            req.stream = upload
            for piece in self._body:
                upload.feed(piece)
            self._body = []
            self._enqueue(req)
        upload.feed(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        if self.stopped or self.parser.should_upgrade():
            # Pipelined after a request that closed the connection, or an
            # upgrade: HttpParserUpgrade comes next (data_received).
            return
        upload = self._upload
        if upload is not None:
            self._upload = None
            upload.end_body()
            return
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        self._enqueue(self._request(Request, body))

    def _upgrade(self, rest: bytes) -> None:
        """An Upgrade or CONNECT: a WebSocket is tunnelled (natsmesh_sidecar.stream.tunnel)."""
        from natsmesh_sidecar.stream import tunnel

        if self.stopped or self.transport is None:
            return  # pipelined after a request that closes the connection
        refused = tunnel.refusal(self.parser.get_method(), self._special.get("upgrade", ""))
        if refused is not None:
            self._fail(400, "upgrade_not_supported", refused)
            return
        try:
            req = self._request(StreamedRequest, b"")
        except _Reject:
            self._fail(*(self.reject or (400, "bad_request", "invalid request target")))
            return
        self.stopped = True  # nothing more to parse: the rest is the tunnel's
        req.keep_alive = False  # an upgrade refused ends the connection
        limits = self.handler.stream_limits
        # Routed as a streamed request: the handler uses only what both kinds have.
        upgrade = tunnel.CallerTunnel(limits, self.transport, rest)
        req.stream = self.stream = cast("CallerStream", upgrade)
        self._enqueue(req)

    def _request(self, cls: type[R], body: bytes) -> R:
        parser = self.parser
        method = parser.get_method().decode("latin-1")
        url = self._url.decode("latin-1")
        host = self._special.get("host", "")
        if not url.startswith("/"):
            # Absolute-form (an HTTP_PROXY client): the URL names the destination.
            try:
                parsed = httptools.parse_url(self._url)
            except httptools.HttpParserInvalidURLError:
                self.reject = (400, "bad_request", "invalid request target")
                raise _Reject from None
            if parsed.host:
                host = parsed.host.decode("latin-1")
            url = (parsed.path or b"/").decode("latin-1")
            if parsed.query:
                url += "?" + parsed.query.decode("latin-1")
        keep_alive = parser.should_keep_alive()
        return cls(method, url, host, self._headers, self._special, body, keep_alive)

    def _enqueue(self, req: Request) -> None:
        self.queue.append(req)
        if len(self.queue) > 32 and not self.paused and self.transport is not None:
            # A client pipelining faster than we answer: stop reading until we catch up.
            self.paused = True
            self.transport.pause_reading()
        if not self.busy:
            self.busy = True
            self._pump()

    # -- responses ----------------------------------------------------------

    def _fail(self, status: int, code: str, message: str) -> None:
        """Answer an unparseable request after the ones before it, then close."""
        self.stopped = True
        rid = codec.new_request_id()
        body = codec.error_body(code, message, rid)
        resp = codec.render_response(
            status,
            [("content-type", "application/json"), ("x-request-id", rid)],
            body,
            keep_alive=False,
        )
        self.handler.app.metrics.observe("outbound", self.handler.app.source, "-", status, 0.0)
        logger.info("rejected request: %d %s", status, message)
        self.queue.append(resp)
        if not self.busy:
            self.busy = True
            self._pump()

    def _pump(self) -> None:
        """Answer the queued requests in order; ``busy`` while one is in hand.

        A request waiting on NATS comes back through :meth:`_resume`: no task
        per request.
        """
        try:
            while self.queue:
                item = self.queue.popleft()
                if isinstance(item, bytes):
                    self._write(item)
                    self._close()
                    break
                resp = self.handler.start(item, self._resume_cb)
                if resp is None:
                    return
                if not self._answered(item, resp):
                    break
            else:
                if self.eof:
                    self._close()
        except Exception:
            logger.exception("outbound connection failed")
            self._close()
        self.busy = False
        self.last = time.monotonic()

    def _resume(self, item: Request, resp: bytes | CallerStream) -> None:
        if resp.__class__ is not bytes:
            # A streamed response: it writes itself, then calls here with b"".
            cast("CallerStream", resp).attach(self, item, self._resume_cb)
            return
        try:
            answered = self._answered(item, resp)
        except Exception:
            logger.exception("outbound connection failed")
            self._close()
            answered = False
        if answered and (self.queue or self.eof):
            self._pump()
        else:
            # Nothing more to answer now (what _pump ends with).
            self.busy = False
            self.last = time.monotonic()

    def _answered(self, item: Request, resp: bytes) -> bool:
        """Write a response; False when the connection is done with."""
        if self.closed:
            return False
        if self.transport is not None:
            self.transport.write(resp)
        if not item.keep_alive or self.server.draining:
            self._close()
            return False
        if self.paused and len(self.queue) < 8 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return True

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _close(self) -> None:
        self.stopped = True
        if self.transport is not None and not self.closed:
            self.transport.close()

    def sweep(self, now: float) -> None:
        """Called periodically: enforce the header deadline and the idle timeout."""
        if self.closed or self.busy:
            return
        if self.in_headers and now - self.started > self.server.header_timeout:
            self._fail(408, "request_timeout", "request headers not received in time")
        elif self.in_message:
            if now - self.last > self.server.header_timeout:
                # A body that stalls half-way is the same attack as slow headers.
                self._fail(408, "request_timeout", "request body not received in time")
        elif not self.queue and now - self.last > self.server.idle_timeout:
            # An idle keep-alive connection is closed silently, as a proxy does:
            # never answer a request that was not received.
            self._close()


class OutboundServer:
    """The listener plus its connection set (for sweeping and draining)."""

    def __init__(
        self,
        handler: OutboundHandler,
        *,
        max_header_bytes: int = 64 * 1024,
        header_timeout: float = 10.0,
        idle_timeout: float = 120.0,
    ) -> None:
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.connections: set[OutboundConnection] = set()
        self.server: asyncio.Server | None = None
        self.draining = False
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: OutboundConnection(self), host, port, reuse_address=True, backlog=1024
        )
        self._sweeper = loop.create_task(self._sweep())
        return int(self.server.sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        period = max(0.05, min(1.0, self.header_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.sweep(now)

    def stop_accepting(self) -> None:
        self.draining = True
        if self.server is not None:
            self.server.close()
        # Idle keep-alive connections would otherwise hold the drain open.
        for conn in list(self.connections):
            if not conn.busy and not conn.queue:
                conn._close()

    async def close(self) -> None:
        self.stop_accepting()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn._close()


#: (status, headers, body, destination, route, attempts, error code)
Result = tuple[int, list[tuple[str, str]], bytes, str, str, int, str]
#: How a handler hands a later answer to the connection.
Done = Callable[[Request, "bytes | CallerStream"], None]
#: The outcome of a reply that says the response streams (natsmesh_sidecar.stream).
STREAMED = "streamed"
#: A streamed request body outgrew its rule's ``max_body_bytes``
#: (natsmesh_sidecar.stream.caller.CallerStream.feed).
BODY_LIMIT = "body_limit"
#: Outcomes of an upload whose stream broke before any response.
_STREAM_BROKE = frozenset({"aborted", "bad_stream", "cut", "bad_subject"})


class _Plan:
    """A routed request: everything the NATS attempts and the answer need."""

    __slots__ = ("abort", "breaker", "delay", "dest_key", "head", "rule", "simple", "subject")

    def __init__(
        self,
        dest_key: str,
        rule: Rule,
        subject: str,
        breaker: resilience.Breaker | None,
        delay: float,
        abort: int | None,
        head: bytes,
    ) -> None:
        self.dest_key = dest_key
        self.rule = rule
        self.subject = subject
        self.breaker = breaker
        self.delay = delay
        self.abort = abort
        #: The NATS header block up to the per-attempt timeout (``_per_try``).
        self.head = head
        #: No retry and no breaker: a reply is the answer as it is (``_answer``).
        self.simple = breaker is None and rule.retries.attempts <= 0


class OutboundHandler:
    """Turns one request into one response; never raises.

    :meth:`start` is the connection's entry: a request that needs nothing
    but one NATS request (no policy fetch, no fault delay, no retry) is
    answered from callbacks, without a task or a coroutine chain; anything
    else continues in a task running the same steps (:meth:`_finish_async`).
    """

    def __init__(self, app: Sidecar) -> None:
        self.app = app
        self.inflight = 0
        self.stream_limits = app.settings.stream_limits()
        self._rand = random.random
        #: id(destination) -> what selecting its rule needs (:meth:`_select`).
        self._selection: dict[int, tuple[Destination, bool, Rule | None]] = {}

    def _select(self, dest: Destination) -> tuple[Destination, bool, Rule | None]:
        """(dest, whether a rule matches on headers, its sole rule if that rule
        matches on the path alone); cached per destination object, which the
        entry keeps alive so its id is not reused."""
        rules = dest.rules
        sole = rules[0] if len(rules) == 1 else None
        if sole is not None and (sole.match.methods or sole.match.headers):
            sole = None
        found = (dest, any(r.match.headers for r in rules), sole)
        if len(self._selection) >= 1024:
            self._selection.clear()  # tables were swapped many times
        self._selection[id(dest)] = found
        return found

    def start(self, req: Request, done: Done) -> bytes | None:
        """The response now, or None when ``done(req, response)`` will be called later."""
        t0 = time.perf_counter()
        rid = req.special.get("x-request-id") or codec.new_request_id()
        self.inflight += 1
        try:
            if req.__class__ is not Request:
                self._later(req, self._stream_call(cast(StreamedRequest, req), rid, t0), done)
                return None
            if req.path.startswith(EVENTS_PREFIX):
                self._later(req, self._finish_async(req, rid, t0, None), done)
                return None
            step = self._route(req, rid, MISS)
            if step.__class__ is not _Plan:
                if isinstance(step, tuple):
                    return self._respond(req, rid, t0, step)
                self._later(req, self._finish_async(req, rid, t0, step), done)
                return None
            plan = step
            if plan.delay or plan.abort is not None:
                self._later(req, self._finish_async(req, rid, t0, plan), done)
                return None
            deadline = time.monotonic() + plan.rule.timeout_ms / 1000.0
            limit, hdr = self._per_try(plan, deadline)
            unsent = self._unsendable(req.body, limit)
            if unsent is not None:
                # Without a reply there is no stream.
                return cast(
                    "bytes | None", self._after(req, rid, t0, plan, deadline, unsent, None, done)
                )

            def replied(result: Reply | str) -> None:
                resp: bytes | CallerStream | None
                try:
                    if plan.simple and result.__class__ is Reply:
                        resp = self._answer(req, rid, t0, plan, result)
                    else:
                        outcome, reply = _received(result)
                        resp = self._after(req, rid, t0, plan, deadline, outcome, reply, done)
                except Exception as exc:
                    resp = self._crashed(req, rid, t0, exc)
                if resp is not None:
                    done(req, resp)

            fast = self.app.fast
            assert fast is not None
            if not fast.send_request(plan.subject, hdr, req.body, limit, replied):
                after = self._after(req, rid, t0, plan, deadline, "unavailable", None, done)
                return cast("bytes | None", after)
            return None
        except Exception as exc:
            return self._crashed(req, rid, t0, exc)

    def _answer(
        self, req: Request, rid: str, t0: float, plan: _Plan, reply: Reply
    ) -> bytes | CallerStream:
        """A reply to a plan without retries or breaker: what :meth:`_settle` and
        :meth:`_respond` make of it, in one step for the common case."""
        rh = reply.headers
        status = codec.final_status(rh.get(codec.H_STATUS))
        if status is None or codec.H_ERROR in rh:
            # No valid status (a 502, or a streamed response) or an error code
            # to add the request id for.
            outcome, got = _received(reply)
            step = self._settle(req, rid, plan, 0, outcome, got, 0.0)
            assert not isinstance(step, float)  # no retries in a simple plan
            if isinstance(step, tuple):
                return self._respond(req, rid, t0, step)
            return self._streaming(req, rid, t0, step)
        try:
            block = codec.http_block(rh)[0]
            resp = codec.render_block_response(
                status, block, reply.data, req.keep_alive, req.method == "HEAD"
            )
        except Exception as exc:
            return self._crashed(req, rid, t0, exc, plan.dest_key, plan.rule.name, 1)
        self.inflight -= 1
        self._record(req, rid, t0, status, plan.dest_key, plan.rule.name, 1, "")
        return resp

    def _after(
        self,
        req: Request,
        rid: str,
        t0: float,
        plan: _Plan,
        deadline: float,
        outcome: str | int,
        reply: Reply | None,
        done: Done,
    ) -> bytes | CallerStream | None:
        """The first attempt's outcome: the response, or None if a retry task took over."""
        step = self._settle(req, rid, plan, 0, outcome, reply, deadline)
        if isinstance(step, tuple):
            return self._respond(req, rid, t0, step)
        if not isinstance(step, float):
            return self._streaming(req, rid, t0, step)
        self._later(req, self._retry(req, rid, t0, plan, step, deadline), done)
        return None

    def _later(
        self,
        req: Request,
        coro: Coroutine[Any, Any, bytes | CallerStream],
        done: Done,
    ) -> None:
        def finished(task: asyncio.Task[bytes | CallerStream]) -> None:
            if not task.cancelled():
                done(req, task.result())

        asyncio.get_running_loop().create_task(coro).add_done_callback(finished)

    async def _finish_async(
        self, req: Request, rid: str, t0: float, plan: _Plan | str | None
    ) -> bytes | CallerStream:
        try:
            if req.path.startswith(EVENTS_PREFIX):
                status, headers, body = await self.app.events.publish_http(req, rid)
                result: Result | CallerStream = (status, headers, body, "_events", "-", 0, "")
            else:
                result = await self._call(req, rid, plan)
        except Exception as exc:
            return self._crashed(req, rid, t0, exc)
        if isinstance(result, tuple):
            return self._respond(req, rid, t0, result)
        return self._streaming(req, rid, t0, result)

    async def _retry(
        self, req: Request, rid: str, t0: float, plan: _Plan, backoff: float, deadline: float
    ) -> bytes | CallerStream:
        try:
            await asyncio.sleep(backoff)
            result = await self._attempts(req, rid, plan, 1, deadline)
        except Exception as exc:
            return self._crashed(req, rid, t0, exc)
        if isinstance(result, tuple):
            return self._respond(req, rid, t0, result)
        return self._streaming(req, rid, t0, result)

    async def _stream_call(self, req: StreamedRequest, rid: str, t0: float) -> bytes | CallerStream:
        """A request whose body streams: never retried (its body is read once)."""
        try:
            step = await self._prepare(req, rid, None)
            if isinstance(step, tuple):
                result = step
            else:
                answer = await self._streamed(req, rid, step)
                if not isinstance(answer, tuple):
                    return self._streaming(req, rid, t0, answer)
                result = answer
        except Exception as exc:
            req.keep_alive = False
            return self._crashed(req, rid, t0, exc)
        # Answered without reading the body to its end: the connection cannot go on.
        req.keep_alive = False
        return self._respond(req, rid, t0, result)

    async def _streamed(self, req: StreamedRequest, rid: str, plan: _Plan) -> Result | CallerStream:
        from natsmesh_sidecar.stream import protocol

        app, rule = self.app, plan.rule
        if not protocol.same_namespace(plan.subject):
            status, code, message = req.stream.CROSS_NAMESPACE
            s, h, b = self._error(status, code, message, rid)
            return s, h, b, plan.dest_key, rule.name, 0, code
        if req.stream.limit_body(rule.max_body_bytes):
            return self._body_limit(rule, plan.dest_key, rid)
        req.stream.limits = self._limits(rule)
        fast = app.fast
        reply: Reply | None = None
        streamed: CallerStream | None = None
        if fast is None or app.nc is None or not app.nc.is_connected:
            outcome: str | int = resilience.UNAVAILABLE
        else:
            # Nm-Stream-Method, not Nm-Method: a callee too old to stream
            # answers 400 rather than call its app with an empty body.
            mesh = plan.head.replace(b"\r\nNm-Method: ", b"\r\nNm-Stream-Method: ", 1)
            head = b"%sNm-Timeout-Ms: %d\r\n" % (mesh, rule.timeout_ms)
            answer = await req.stream.start_upload(
                fast, plan.subject, head, rule.timeout_ms / 1000.0
            )
            if isinstance(answer, Reply):
                outcome, reply = _received(answer)
            elif isinstance(answer, str):
                outcome = answer
            else:
                outcome, streamed = STREAMED, answer
                answer.destination, answer.route = plan.dest_key, rule.name
        if outcome == BODY_LIMIT:
            # A chunked body outgrew the rule's limit on its way: the callee was told.
            return self._body_limit(rule, plan.dest_key, rid, attempts=1)
        if outcome in _STREAM_BROKE:
            # The stream broke before a response (an abort, a protocol error).
            if plan.breaker is not None:
                plan.breaker.record(False, time.monotonic())
            s, h, b = self._error(
                502, "stream_failed", f"streamed call to {plan.subject} broke ({outcome})", rid
            )
            return s, h, b, plan.dest_key, rule.name, 1, "stream_failed"
        # The last attempt's number: no retry.
        step = self._settle(
            req, rid, plan, rule.retries.attempts, outcome, reply, 0.0, streamed=streamed
        )
        assert not isinstance(step, float)
        return step

    def _relay(self, req: Request, rid: str, plan: _Plan, reply: Reply) -> Result | CallerStream:
        """A reply that says the response streams: the stream that relays it."""
        from natsmesh_sidecar.stream.caller import CallerStream
        from natsmesh_sidecar.stream.protocol import StreamError

        fast = self.app.fast
        try:
            if fast is None:
                raise StreamError("NATS connection lost")
            stream = CallerStream.from_head(
                fast, self._limits(plan.rule), plan.subject, reply, keep_alive=req.keep_alive
            )
        except StreamError as exc:
            s, h, b = self._error(502, "bad_stream", f"{plan.subject} streamed badly: {exc}", rid)
            return s, h, b, plan.dest_key, plan.rule.name, 1, "bad_stream"
        stream.destination, stream.route = plan.dest_key, plan.rule.name
        return stream

    def _body_limit(self, rule: Rule, dest_key: str, rid: str, attempts: int = 0) -> Result:
        """413 for a request body past its rule's ``max_body_bytes``."""
        limit, name = rule.max_body_bytes, rule.name
        message = f"request body exceeds {limit} bytes, the maxBodyBytes of route {name}"
        s, h, b = self._error(413, "payload_too_large", message, rid)
        return s, h, b, dest_key, name, attempts, "payload_too_large"

    def _limits(self, rule: Rule) -> StreamLimits:
        """The stream limits of a call by ``rule``: its ``stream`` settings, else the sidecar's."""
        base, policy = self.stream_limits, rule.stream
        if policy is None:
            return base
        return StreamLimits(
            chunk_bytes=base.chunk_bytes,
            window=policy.window or base.window,
            idle_timeout_s=policy.idle_timeout_ms / 1000.0 or base.idle_timeout_s,
        )

    def _streaming(self, req: Request, rid: str, t0: float, stream: CallerStream) -> CallerStream:
        """Count and log a request whose response streams, at its head (the
        access log's duration is the time to the first byte)."""
        self.inflight -= 1
        self._record(req, rid, t0, stream.status, stream.destination, stream.route, 1, "")
        return stream

    def _respond(self, req: Request, rid: str, t0: float, result: Result) -> bytes:
        """Render the response; count and log the request."""
        status, headers, body, dest_key, route, attempts, error = result
        try:
            if error:
                headers.append(("x-request-id", rid))
            resp = codec.render_response(
                status, headers, body, keep_alive=req.keep_alive, head=req.method == "HEAD"
            )
        except Exception as exc:
            return self._crashed(req, rid, t0, exc, dest_key, route, attempts)
        self.inflight -= 1
        self._record(req, rid, t0, status, dest_key, route, attempts, error)
        return resp

    def _crashed(
        self,
        req: Request,
        rid: str,
        t0: float,
        exc: Exception,
        dest_key: str = "-",
        route: str = "-",
        attempts: int = 0,
    ) -> bytes:
        logger.error("outbound request failed", exc_info=exc)
        self.inflight -= 1
        self._record(req, rid, t0, 500, dest_key, route, attempts, "internal")
        return codec.render_response(
            500,
            [("content-type", "application/json"), ("x-request-id", rid)],
            codec.error_body("internal", f"sidecar error: {type(exc).__name__}", rid),
            keep_alive=False,
        )

    def _record(
        self,
        req: Request,
        rid: str,
        t0: float,
        status: int,
        dest_key: str,
        route: str,
        attempts: int,
        error: str,
    ) -> None:
        app = self.app
        elapsed = time.perf_counter() - t0
        app.metrics.observe("outbound", app.source, dest_key, status, elapsed)
        tracer = app.tracer
        if tracer is not None:
            tracer.outbound(
                req.traceparent,
                req.special.get("traceparent"),
                elapsed,
                method=req.method,
                path=req.path,
                destination=dest_key,
                route=route,
                status=status,
                error=error,
                attempts=attempts,
                request_id=rid,
            )
        if app.access_log:
            accesslog.log(
                request_id=rid,
                direction="outbound",
                source=app.source,
                destination=dest_key,
                route=route,
                method=req.method,
                path=req.path,
                status=status,
                duration_s=elapsed,
                attempts=attempts,
                error=error,
            )
        tap = app.tap
        if tap is not None:
            tap.request(
                direction="outbound",
                method=req.method,
                path=req.path,
                status=status,
                duration_s=elapsed,
                source=app.source,
                destination=dest_key,
                request_id=rid,
                route=route,
                error=error,
            )

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        rid: str,
        extra: list[tuple[str, str]] | None = None,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = [("content-type", "application/json")]
        if extra:
            headers.extend(extra)
        return status, headers, codec.error_body(code, message, rid)

    async def _call(
        self, req: Request, rid: str, plan: _Plan | str | None = None
    ) -> Result | CallerStream:
        """(status, headers, body, destination, route, attempts, error code), or a stream."""
        step = await self._prepare(req, rid, plan)
        if isinstance(step, tuple):
            return step
        deadline = time.monotonic() + step.rule.timeout_ms / 1000.0
        return await self._attempts(req, rid, step, 0, deadline)

    async def _prepare(self, req: Request, rid: str, plan: _Plan | str | None) -> Result | _Plan:
        """Route (fetching the policy if need be) and apply the rule's faults."""
        app = self.app
        step = self._route(req, rid, MISS) if plan is None else plan
        if isinstance(step, str):
            # A service of our own namespace whose policy is not cached yet.
            dest_key = step
            svc = dest_key.partition(".")[0]
            assert app.targets is not None
            try:
                policy = await app.targets.get(svc)
            except Exception as exc:
                s, h, b = self._error(
                    503, "table_unavailable", f"policy of {dest_key} unreadable: {exc}", rid
                )
                return s, h, b, dest_key, "-", 0, "table_unavailable"
            step = self._route(req, rid, policy)
            assert not isinstance(step, str)
        if isinstance(step, tuple):
            return step
        rule = step.rule
        if step.delay:
            await asyncio.sleep(step.delay)
        if step.abort is not None:
            s, h, b = self._error(
                step.abort, "fault_injected", f"fault injected by route {rule.name}", rid
            )
            return s, h, b, step.dest_key, rule.name, 0, "fault_injected"
        return step

    def _route(self, req: Request, rid: str, policy: object) -> Result | _Plan | str:
        """Resolve, authorise and plan a request; no awaiting.

        A result tuple answers it at once; a string is the destination whose
        policy must be fetched first (then call again with ``policy``).
        """
        app = self.app
        router = app.router
        found, dest_key, dest = router.resolve(req.host)
        if dest is None and found == UNKNOWN and app.targets is not None:
            # A service of our own namespace: its own KV key (see targets.py).
            svc, _, ns = dest_key.partition(".")
            if ns == app.settings.namespace:
                targets = app.targets
                if policy is MISS:
                    policy = targets.cached(svc)
                    if policy is MISS:
                        return dest_key
                if isinstance(policy, Target):
                    if policy.admits(app.settings.service):
                        found, dest = FOUND, targets.destinations[svc]
                    else:
                        found = FORBIDDEN
        if dest is None:
            if not req.host:
                s, h, b = self._error(400, "bad_request", "no Host header and no absolute URI", rid)
                return s, h, b, "-", "-", 0, "bad_request"
            if found == FORBIDDEN:
                s, h, b = self._error(
                    403, "forbidden", f"{app.source} may not call {dest_key}", rid
                )
                return s, h, b, dest_key, "-", 0, "forbidden"
            assert found == UNKNOWN
            s, h, b = self._error(404, "unknown_service", f"no service {dest_key} in the mesh", rid)
            return s, h, b, "-", "-", 0, "unknown_service"

        selection = self._selection.get(id(dest))
        if selection is None or selection[0] is not dest:
            selection = self._select(dest)
        sole = selection[2]
        if sole is not None:
            # One rule matching on the path alone: what select_rule decides.
            rule = sole if req.path.startswith(sole.match.path_prefix) else None
        else:
            rule = resilience.select_rule(
                dest.rules,
                req.method,
                req.path,
                req.lower_headers() if selection[1] else req.special,
            )
        if rule is None:
            s, h, b = self._error(
                404, "no_route", f"no route of {dest_key} matches {req.path}", rid
            )
            return s, h, b, dest_key, "-", 0, "no_route"
        weighted = rule.destinations
        if len(weighted) == 1:
            # pick_destination's first case, without drawing a random number.
            target = weighted[0] if weighted[0].weight > 0 else None
        else:
            target = resilience.pick_destination(weighted, self._rand())
        if target is None:
            s, h, b = self._error(
                503, "no_destination", f"route {rule.name} has no weighted destination", rid
            )
            return s, h, b, dest_key, rule.name, 0, "no_destination"
        subject = target.subject + app.caller_suffix
        if not app.permissions.can_publish(subject):
            s, h, b = self._error(
                403, "forbidden", f"{app.source} is not permitted to publish to {subject}", rid
            )
            return s, h, b, dest_key, rule.name, 0, "forbidden"
        if len(req.body) > app.max_body():
            s, h, b = self._error(
                413, "payload_too_large", "request body exceeds the NATS max_payload", rid
            )
            return s, h, b, dest_key, rule.name, 0, "payload_too_large"
        if rule.max_body_bytes and len(req.body) > rule.max_body_bytes:
            return self._body_limit(rule, dest_key, rid)

        config = rule.circuit_breaker
        breaker = None if config is None else app.breaker(subject, config)
        if breaker is not None and not breaker.allow(now := time.monotonic()):
            app.metrics.circuit_refused.labels(subject).inc()
            s, h, b = self._error(
                503,
                "circuit_open",
                f"circuit to {subject} is open",
                rid,
                [("retry-after", str(breaker.retry_after(now)))],
            )
            return s, h, b, dest_key, rule.name, 0, "circuit_open"

        delay, abort = 0.0, None
        if rule.fault is not None:
            delay, abort = resilience.fault_decision(rule.fault, self._rand(), self._rand())

        head = _head(req, rid, app.source, app.tracer)
        policy = rule.stream
        if policy is not None:
            # The callee's end of a stream takes these (its response may stream too).
            head += codec.stream_lines(policy.window, policy.idle_timeout_ms)
        return _Plan(dest_key, rule, subject, breaker, delay, abort, head)

    def _per_try(self, plan: _Plan, deadline: float) -> tuple[float, bytes]:
        """The next attempt's time limit and its NATS header block."""
        remaining = deadline - time.monotonic()
        per_try = remaining
        retries = plan.rule.retries
        if retries.per_try_timeout_ms:
            per_try = min(remaining, retries.per_try_timeout_ms / 1000.0)
        # Nm-Timeout-Ms is the last header: it changes per attempt.
        return per_try, b"%sNm-Timeout-Ms: %d\r\n\r\n" % (plan.head, int(per_try * 1000))

    async def _attempts(
        self, req: Request, rid: str, plan: _Plan, attempt: int, deadline: float
    ) -> Result | CallerStream:
        """Attempts from ``attempt`` on until one settles the request."""
        while True:
            per_try, hdr = self._per_try(plan, deadline)
            sent = self._send(plan.subject, req.body, per_try, hdr)
            outcome, reply = sent if isinstance(sent, tuple) else _received(await sent)
            step = self._settle(req, rid, plan, attempt, outcome, reply, deadline)
            if not isinstance(step, float):
                return step
            attempt += 1
            await asyncio.sleep(step)

    def _settle(
        self,
        req: Request,
        rid: str,
        plan: _Plan,
        attempt: int,
        outcome: str | int,
        reply: Reply | None,
        deadline: float,
        *,
        streamed: object = None,
    ) -> Result | float | CallerStream:
        """An attempt's outcome: the result, or the backoff before the next attempt.

        A streamed response is never retried: its first chunk may already be
        on the client's socket.
        """
        app = self.app
        breaker, subject, dest_key, rule = plan.breaker, plan.subject, plan.dest_key, plan.rule
        retries = rule.retries
        if outcome == STREAMED:
            if streamed is None:
                assert reply is not None
                streamed = self._relay(req, rid, plan, reply)
            if isinstance(streamed, tuple):
                outcome = streamed[0]
            else:
                outcome = cast("CallerStream", streamed).status
            if breaker is not None:
                breaker.record(resilience.verdict(outcome), time.monotonic())
            return cast("Result | CallerStream", streamed)
        if (
            outcome not in resilience.CALLER_SIDE
            and attempt < retries.attempts
            and resilience.retryable(outcome, retries, req.method)
        ):
            backoff = resilience.backoff_seconds(attempt, retries, self._rand())
            if time.monotonic() + backoff < deadline:
                app.metrics.retries.labels(dest_key).inc()
                return backoff

        attempts = attempt + 1
        if breaker is not None:
            # Once per request, with its final outcome: a retry that got
            # through is a success, three failed attempts are one failure.
            breaker.record(resilience.verdict(outcome), time.monotonic())
        if outcome == resilience.UNAVAILABLE:
            s, h, b = self._error(
                503,
                "nats_unavailable",
                "NATS connection is down; retry shortly",
                rid,
                [("retry-after", "1")],
            )
            return s, h, b, dest_key, rule.name, attempts, "nats_unavailable"
        if outcome == resilience.VIOLATION:
            # The server refused the publish (its JWT view is narrower than
            # ours was); the sidecar now knows and refuses up front.
            s, h, b = self._error(
                403,
                "permission_violation",
                f"NATS refused {app.source} publishing to {subject}",
                rid,
            )
            return s, h, b, dest_key, rule.name, attempts, "permission_violation"
        if outcome == resilience.TOO_LARGE:
            s, h, b = self._error(
                413, "payload_too_large", "request exceeds the NATS max_payload", rid
            )
            return s, h, b, dest_key, rule.name, attempts, "payload_too_large"
        if outcome == resilience.NO_RESPONDERS:
            s, h, b = self._error(503, "no_responders", f"no instance of {subject} is serving", rid)
            return s, h, b, dest_key, rule.name, attempts, "no_responders"
        if outcome == resilience.TIMEOUT:
            s, h, b = self._error(
                504, "timeout", f"{subject} did not answer within {rule.timeout_ms} ms", rid
            )
            return s, h, b, dest_key, rule.name, attempts, "timeout"
        assert reply is not None
        rh = reply.headers or {}
        status = codec.final_status(rh.get(codec.H_STATUS))
        if status is None:
            # A callee (or anything answering on its subject) that names no
            # final status is a bad gateway, never a 1xx on the app's connection.
            s, h, b = self._error(
                502, "bad_status", f"{subject} answered without a valid status", rid
            )
            return s, h, b, dest_key, rule.name, attempts, "bad_status"
        return (
            status,
            codec.nats_to_http(rh),
            reply.data,
            dest_key,
            rule.name,
            attempts,
            rh.get(codec.H_ERROR, ""),
        )

    def _unsendable(self, body: bytes, limit_s: float) -> str | None:
        """Why a NATS request cannot be sent now, or None."""
        nc = self.app.nc
        if nc is None or self.app.fast is None or not nc.is_connected:
            return "unavailable"
        if limit_s <= 0:
            return resilience.TIMEOUT
        if len(body) > nc.max_payload:
            return "too_large"
        return None

    def _send(
        self, subject: str, body: bytes, limit_s: float, hdrs: bytes
    ) -> tuple[str | int, Reply | None] | asyncio.Future[Reply | str]:
        """One NATS request: its future, or the outcome when it cannot be sent."""
        unsent = self._unsendable(body, limit_s)
        if unsent is not None:
            return unsent, None
        assert self.app.fast is not None
        return self.app.fast.request(subject, hdrs, body, limit_s)


def _head(req: Request, rid: str, source: str, tracer: Tracer | None) -> bytes:
    """The request's NATS header block, less Nm-Timeout-Ms and the blank line.

    The app's headers (:func:`codec.nats_lines`), then the mesh's and the two
    the parser kept aside (the app still needs them): what
    ``natsfast.encode_headers`` writes for the dict of all of them, built
    as text at once.
    """
    special = req.special
    incoming = special.get("traceparent")
    tp = req.traceparent = (
        codec.next_traceparent(incoming) if tracer is None else tracer.next_traceparent(incoming)
    )
    mesh = (
        f"Nm-Method: {req.method}\r\nNm-Target: {req.target}\r\nNm-Source: {source}\r\n"
        f"X-Request-Id: {rid}\r\ntraceparent: {tp}\r\n"
    )
    lines = 5
    ct = special.get("content-type")
    if ct is not None:
        mesh += f"content-type: {ct}\r\n"
        lines += 1
    key = special.get("idempotency-key")
    if key is not None:
        mesh += f"idempotency-key: {key}\r\n"
        lines += 1
    if mesh.count("\n") != lines or mesh.count("\r") != lines:
        # A value held CR or LF: blanked, as encode_headers does.
        pairs = [
            (codec.H_METHOD, req.method),
            (codec.H_TARGET, req.target),
            (codec.H_SOURCE, source),
            (codec.REQUEST_ID, rid),
            (codec.TRACEPARENT, tp),
            ("content-type", ct),
            ("idempotency-key", key),
        ]
        mesh = "".join(f"{k}: {v.translate(_NEWLINES)}\r\n" for k, v in pairs if v is not None)
    return f"NATS/1.0\r\n{codec.nats_lines(req.headers)}{mesh}".encode()


def _received(reply: Reply | str) -> tuple[str | int, Reply | None]:
    if isinstance(reply, str):
        # TIMEOUT and NO_RESPONDERS are resilience's names too.
        return reply, None
    status = codec.final_status(reply.headers.get(codec.H_STATUS)) or 502
    if status == 502:
        if codec.H_UNDELIVERED in reply.headers:
            # The callee's app refused the connection (it is starting or dying):
            # like no responders, safe to try another replica.
            return resilience.UNDELIVERED, reply
        if codec.H_STREAM in reply.headers and codec.H_STATUS not in reply.headers:
            return STREAMED, reply
    return status, reply
