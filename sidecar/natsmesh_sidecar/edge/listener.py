"""The outbound edge: the listener on 127.0.0.1:15001 the app's HTTP calls reach.

:class:`OutboundConnection` is a raw asyncio Protocol fed to httptools: no
framework, and no per-request task: a request waiting on NATS is answered
from the reply's callback (a task only for retries, fault delays, policy
fetches and events).
Pipelined requests queue per connection and are answered strictly in order.
Untrusted input is bounded: URL and header bytes, and a header deadline
against slowloris clients (408). A body that outgrows one NATS message
streams (natsmesh_sidecar.transport.stream, imported then): the request is started
with what arrived and the rest follows as the client sends it. An
``Upgrade: websocket`` is routed the same way and, once the callee's app
switched protocols, tunnelled (natsmesh_sidecar.transport.stream.tunnel).

What a parsed request (natsmesh_sidecar.edge.request) becomes is the handler's business
(natsmesh_sidecar.calls.outbound); this module knows only its ``start``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sized
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import httptools

from natsmesh_sidecar import codec
from natsmesh_sidecar.edge.request import (
    _DROPPED,
    _FORWARD,
    _HOST,
    _NAMES,
    Handler,
    Request,
    StreamedRequest,
    _name,
)
from natsmesh_sidecar.wire import StreamLimits

if TYPE_CHECKING:
    from natsmesh_sidecar.observe.metrics import Metrics
    from natsmesh_sidecar.transport.stream.caller import CallerStream

logger = logging.getLogger(__name__)
R = TypeVar("R", bound=Request)

MAX_URL = 8192
#: After an error answer, the connection closes once its client has sent
#: nothing for this long (or has closed its side), at the latest after
#: LINGER_MAX_SECONDS: see Connection._linger.
LINGER_IDLE_SECONDS = 2.0
LINGER_MAX_SECONDS = 30.0
EVENTS_PREFIX = "/_events/"
_EVENTS_PREFIX_B = EVENTS_PREFIX.encode()


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing with an HTTP error."""


class OutboundConnection(asyncio.Protocol):
    """One client connection; keep-alive and pipelining-safe."""

    def __init__(self, server: OutboundServer) -> None:
        self.server = server
        self.handler = server.handler
        #: The largest body sent inline (bound once: asked per body piece).
        self._max_body = server.max_body
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
        #: When the connection started lingering after an error answer, else 0.
        self.lingering = 0.0
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._special: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_len = 0
        #: What the handler calls back with a later response (bound once).
        self._resume_cb = self._resume
        #: The stream this connection's client is sending to or reading from
        #: (natsmesh_sidecar.transport.stream.caller.CallerStream), told of the socket's state.
        self.stream: Any = None
        #: The stream of the request whose body is arriving now.
        self._upload: Any = None
        #: The CONNECT target this connection is a tunnel to (what the client
        #: asked of us as its proxy), else "".
        self.tunnelled = ""

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
            if self.lingering:
                self.last = time.monotonic()
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
            if self.tunnelled and data[:1] == b"\x16":
                # A TLS ClientHello: an https:// URL through us as a proxy.
                logger.info("CONNECT %s: TLS inside is not carried, closing", self.tunnelled)
                self.stopped = True
                self._close()
                return
            if (
                self._url == b"*"
                and self.parser.get_method() == b"PRI"
                and self.parser.get_http_version() == "2.0"
                and not self._headers
                and not self.busy
            ):
                # The HTTP/2 preface (h2c with prior knowledge, as gRPC
                # clients connect): the socket is HTTP/2's from here on.
                from natsmesh_sidecar.edge import h2

                self.stopped = True
                h2.take_over(self, data)
                return
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
        if self._body_len > self._max_body():
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
            from natsmesh_sidecar.transport.stream.caller import CallerStream

            length = self._special.get("content-length", "")
            upload = self._upload = CallerStream.for_upload(
                self.server.stream_limits,
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
        """An Upgrade or CONNECT: a WebSocket is tunnelled (transport.stream.tunnel)."""
        from natsmesh_sidecar.transport.stream import tunnel

        if self.stopped or self.transport is None:
            return  # pipelined after a request that closes the connection
        if self.parser.get_method() == b"CONNECT":
            self._connect(rest)
            return
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
        limits = self.server.stream_limits
        # Routed as a streamed request: the handler uses only what both kinds have.
        upgrade = tunnel.CallerTunnel(limits, self.transport, rest)
        req.stream = self.stream = cast("CallerStream", upgrade)
        self._enqueue(req)

    def _connect(self, rest: bytes) -> None:
        """A CONNECT (a client told to use us as its HTTP proxy: gRPC's
        ``http_proxy``, ``curl -p``): answered 200 here, and the bytes inside
        are parsed as a new connection of ours, HTTP/1.1 or h2c.

        Nothing is relayed raw: each request inside is routed and authorised
        as any other, so a tunnel opens only to a mesh service (see
        :meth:`natsmesh_sidecar.calls.route.Planner.tunnel_refusal`). TLS
        inside (an ``https://`` URL through the proxy) cannot be read: the
        connection is closed with a log line, since the client would not
        read an HTTP answer.
        """
        if self.busy or self.queue:
            self._fail(400, "bad_request", "CONNECT pipelined behind other requests")
            return
        authority = self._url.decode("latin-1")
        if ":" not in authority or authority.startswith(("/", "*")):
            self._fail(400, "bad_request", "CONNECT needs a host:port target")
            return
        refused = self.handler.tunnel_refusal(authority)
        if refused is not None:
            self._fail(*refused)
            return
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.parser = httptools.HttpRequestParser(self)
        self.tunnelled = authority
        if rest:
            self.data_received(rest)

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
        self.server.metrics.observe("outbound", self.server.source, "-", status, 0.0)
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
                    self._linger()
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

    def _linger(self) -> None:
        """After an error answer: stop sending, drop what still arrives, then close.

        The client is often still sending the request we refused (the body of
        a 413, the rest of a request past a 408 or 431). Closing a socket with
        unread bytes makes the kernel answer with a RST, and the client's
        stack then discards our answer before the client reads it: it sees
        "connection reset" instead of the status. So the answer is followed
        by a half-close, and the connection stays open, reading and dropping,
        until the client closes its side or sends nothing for
        LINGER_IDLE_SECONDS (nginx's lingering close, for the same reason).
        """
        transport = self.transport
        self.stopped = True
        if transport is None or self.closed:
            return
        if not transport.can_write_eof():
            self._close()
            return
        self.lingering = self.last = time.monotonic()
        if self.paused:
            self.paused = False
            transport.resume_reading()
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_IDLE_SECONDS, self._linger_check)

    def _linger_check(self) -> None:
        if self.closed:
            return
        now = time.monotonic()
        quiet_until = self.last + LINGER_IDLE_SECONDS
        if now >= quiet_until or now - self.lingering >= LINGER_MAX_SECONDS:
            self._close()
            return
        asyncio.get_running_loop().call_later(quiet_until - now, self._linger_check)

    def sweep(self, now: float) -> None:
        """Called periodically: enforce the header deadline and the idle timeout."""
        if self.closed or self.busy or self.lingering:
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


class Connection(Protocol):
    """What the server asks of each connection: an HTTP/1.1 one, or an HTTP/2
    one (natsmesh_sidecar.edge.h2.H2Server)."""

    @property
    def busy(self) -> bool: ...

    @property
    def queue(self) -> Sized: ...

    def sweep(self, now: float) -> None: ...

    def _close(self) -> None: ...


class OutboundServer:
    """The listener plus its connection set (for sweeping and draining)."""

    def __init__(
        self,
        handler: Handler,
        *,
        metrics: Metrics,
        source: str,
        max_body: Callable[[], int],
        stream_limits: StreamLimits,
        max_header_bytes: int = 64 * 1024,
        header_timeout: float = 10.0,
        idle_timeout: float = 120.0,
    ) -> None:
        self.handler = handler
        #: Requests refused before a handler saw them are counted under ``source``.
        self.metrics = metrics
        self.source = source
        #: A body longer than this (the connection's NATS max_payload less
        #: header room, so it changes with the connection) streams.
        self.max_body = max_body
        self.stream_limits = stream_limits
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.connections: set[Connection] = set()
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
