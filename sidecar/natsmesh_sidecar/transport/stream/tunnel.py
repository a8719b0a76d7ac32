"""WebSocket through the mesh: an HTTP Upgrade tunnelled over a streamed call.

Imported only when the first ``Upgrade: websocket`` request comes (on the
caller's outbound listener, or as a head on the callee's service subject).

The upgrade request is a call like any other: its head goes on the
callee's service subject (routes, version splits, permissions, the queue
group and the circuit breaker apply as for a unary call), with
``Nm-Stream: <call>`` and ``Nm-Upgrade: websocket``. The callee's sidecar
opens a connection of its own to the app and writes the upgrade request.

* The app answers **101**: the callee sends a stream head
  (``Nm-Stream-Status: 101``, the app's headers) and credit; from then on
  the two sockets are joined by two byte streams, one per direction, on the
  call's subjects (:mod:`.protocol`: numbered chunks, credit, beats,
  aborts). The sidecars never parse a WebSocket frame: text, binary, ping,
  pong and close travel as bytes between the client and the app.
* Anything else: the callee collects the response (up to one chunk) and
  answers it as a unary reply; the caller writes it as a normal response.

Each side of a tunnel is one object that is at the same time the asyncio
protocol of its socket and the NATS end of the streams (:class:`_End`): no
task per socket, one subscription (the callee's, to the call subject) or
inbox entry (the caller's), and a shared clock for every tunnel of the
process instead of a timer each.

Ending: a socket's EOF (a half-close) ends its direction (``Nm-Eof``), and
the other sidecar half-closes its socket in turn; when both directions
ended, both sockets close. A socket closed or reset before that, an abort,
a protocol error, a peer silent past the stream idle timeout, or the NATS
connection lost cuts the tunnel: the other sidecar resets its socket.
Beats keep an idle tunnel alive for as long as both sidecars are (a
WebSocket may be quiet for hours; the app's own pings are its business).
A beat or a chunk sent with a reply subject comes back as "no responders"
when the other sidecar's subscription is gone: a killed sidecar is noticed
within a quarter of the idle timeout, not a whole one. Across namespaces
messages carry no reply subject (:class:`.callee.Answers`), so there a
killed sidecar is noticed at the idle timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import httptools

from natsmesh_sidecar import codec
from natsmesh_sidecar.transport.natsfast import TIMEOUT, UNAVAILABLE, FastPath, Reply
from natsmesh_sidecar.transport.stream import protocol
from natsmesh_sidecar.transport.stream.callee import (
    Answers,
    drop_subscription,
    streamable,
    unary_block,
    unary_reply,
)
from natsmesh_sidecar.transport.stream.peer import Peer
from natsmesh_sidecar.transport.stream.receiver import Receiver
from natsmesh_sidecar.transport.stream.sender import Sender
from natsmesh_sidecar.wire import StreamLimits

logger = logging.getLogger(__name__)

#: The only protocol tunnelled: h2c and the like are refused (400), CONNECT too.
WEBSOCKET = "websocket"
_UPGRADE_HEADERS = b"upgrade: websocket\r\nconnection: Upgrade\r\n"
MAX_RESPONSE_HEADER_BYTES = 64 * 1024


def refusal(method: bytes, upgrade: str) -> str | None:
    """Why an upgrade request (or CONNECT) is not tunnelled; None for a WebSocket."""
    tokens = {t.strip().lower() for t in upgrade.split(",")}
    if WEBSOCKET not in tokens:
        return f"upgrade to {upgrade[:40]!r} is not supported (only websocket)"
    if method != b"GET":
        return "a WebSocket upgrade must be a GET"
    return None


# -- the clock: one timer for every tunnel ------------------------------------------------


class _Clock:
    """Ticks every tunnel of a period: each beats, or gives up on a silent peer."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.ends: set[_End] = set()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, end: _End) -> None:
        self.ends.add(end)
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.period, self._tick)

    def _tick(self) -> None:
        for end in list(self.ends):
            try:
                end._tick()
            except Exception:
                logger.exception("tunnel tick failed")
        self.timer = None
        if self.ends:
            self.timer = asyncio.get_running_loop().call_later(self.period, self._tick)


_CLOCKS: dict[float, _Clock] = {}


def _clock(period: float) -> _Clock:
    clock = _CLOCKS.get(period)
    if clock is None:
        clock = _CLOCKS[period] = _Clock(period)
    return clock


# -- what both sides share ----------------------------------------------------------------


class _End(Peer, asyncio.Protocol):
    """One side of a tunnel: its socket's protocol and its NATS streams' end.

    ``sender`` carries the socket's bytes to the other side, ``receiver``
    writes the other side's into the socket.
    """

    __slots__ = ("fast", "sender", "transport")

    #: Whose socket this is, for the log.
    side = "socket"

    def __init__(self, limits: StreamLimits) -> None:
        Peer.__init__(self, limits)
        self.fast: FastPath | None = None
        self.transport: asyncio.Transport | None = None
        self.sender = Sender(
            limits.chunk_bytes,
            pause=self._pause,
            resume=self._resume,
            high=limits.chunk_bytes * max(2, limits.window // 2),
        )

    # -- the socket ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self.finished:
            self.sender.feed(data)

    def eof_received(self) -> bool:
        # A half-close: this direction ends, the other may go on.
        if not self.finished:
            self.sender.end()
            self._maybe_close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self.cut(f"the {self.side} closed its connection", transport=False)

    def pause_writing(self) -> None:
        if self.receiver is not None:
            self.receiver.set_blocked(True)

    def resume_writing(self) -> None:
        if self.receiver is not None:
            self.receiver.set_blocked(False)

    def _pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.transport is not None and self.receiver is not None:
            self.transport.resume_reading()

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _peer_eof(self) -> None:
        """The other side's socket half-closed: so does ours."""
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
        self._maybe_close()

    def _joined(self, publish: Callable[[bytes, bytes], bool], credit: int) -> None:
        """Both directions run: the other side's credit came, ours goes out."""
        self.sender.bind(publish, credit)
        self._maybe_close()

    def _maybe_close(self) -> None:
        receiver = self.receiver
        if self.finished or receiver is None or not receiver.done or not self.sender.eof_sent:
            return
        self.finished = True
        self._stop()
        if self.transport is not None:
            self.transport.close()

    # -- the other side ----------------------------------------------------------------

    def _first_credit(self, msg: Reply, credit: int) -> None:
        """The other side's first credit: check it, then :meth:`_joined`."""
        raise NotImplementedError

    def handle(self, what: str, msg: Reply) -> None:
        if what == protocol.CREDIT:
            credit = protocol.credit_of(msg.headers)
            if self.sender.publish is None:
                self._first_credit(msg, credit)
            else:
                self.sender.on_credit(credit)
                self._maybe_close()
        elif what == protocol.NO_RESPONDERS:
            raise protocol.StreamError("the other sidecar is gone (no responders)")
        else:
            raise protocol.StreamError(f"unexpected {what} message in a tunnel")

    def aborted(self, reason: str) -> None:
        self.cut(f"the other side aborted: {reason}", tell=False)

    def broken(self, reason: str) -> None:
        self.cut(reason)

    def silent(self) -> None:
        self.cut("the other sidecar went silent past the stream idle timeout")

    def stalled(self, now: float) -> str | None:
        fast = self.fast
        if fast is not None and not fast.nc.is_connected:
            return "NATS connection lost"
        return None

    def _tell(self, block: bytes, *, credit: bool = False) -> None:
        raise NotImplementedError

    def beat(self) -> None:
        self._tell(protocol.BEAT_BLOCK)

    def _send_credit(self, credit: int) -> None:
        self._tell(protocol.credit_block(credit), credit=True)

    def cut(self, reason: str, *, tell: bool = True, transport: bool = True) -> None:
        """Break the tunnel: the other side is told, our socket reset."""
        if self.finished:
            return
        logger.info("tunnel cut: %s", reason)
        if tell:
            self._tell(protocol.abort_block(reason))
        self.finished = True
        self._stop()
        if transport and self.transport is not None:
            self.transport.abort()

    # -- the clock ---------------------------------------------------------------------

    def _arm(self) -> None:
        _clock(self.beat_s()).add(self)

    def _stop_clock(self) -> None:
        clock = _CLOCKS.get(self.beat_s())
        if clock is not None:
            clock.ends.discard(self)

    def _stop(self) -> None:
        self._stop_clock()


# -- the caller's side ----------------------------------------------------------------------


class _Conn(Protocol):
    """What the tunnel takes over from the outbound connection that parsed the upgrade."""

    transport: asyncio.Transport | None
    stream: Any
    closed: bool
    server: Any


class CallerTunnel(_End):
    """The client's socket on the caller's sidecar.

    Made by the outbound connection when the upgrade request is parsed (its
    socket paused until the answer); the outbound handler routes it as a
    streamed request (:meth:`start_upload`); an answer of 101 comes back as
    this object, which :meth:`attach` then puts in the connection's place.
    """

    __slots__ = (
        "answer",
        "call",
        "call_subject",
        "destination",
        "inbox",
        "response_headers",
        "route",
        "status",
    )

    side = "client"

    def __init__(self, limits: StreamLimits, transport: asyncio.Transport, early: bytes) -> None:
        super().__init__(limits)
        self.transport = transport
        self.call = ""
        self.call_subject = b""
        self.inbox = b""
        self.answer: asyncio.Future[CallerTunnel | Reply | str] | None = None
        self.status = 0
        self.response_headers: Mapping[str, str] = {}
        #: For the access log and metrics (the outbound handler sets them).
        self.destination = "-"
        self.route = "-"
        # Nothing is read until the callee's app switched protocols.
        transport.pause_reading()
        if early:
            self.sender.feed(early)

    async def start_upload(
        self, fast: FastPath, subject: str, head: bytes, timeout_s: float
    ) -> CallerTunnel | Reply | str:
        """Send the upgrade's head (``head``: its NATS header block less the
        blank line) and wait up to ``timeout_s`` (the route's) for the answer:
        this tunnel on a 101, the reply of any other status, or an outcome."""
        if self.finished:
            return "cut"  # the client left while the request waited its turn
        call = protocol.new_call_id()
        call_subject = protocol.call_subject(subject, call)
        if call_subject is None:
            return "bad_subject"
        self.fast = fast
        self.crossing = protocol.crosses(subject)
        self.call, self.call_subject = call, call_subject.encode()
        answer: asyncio.Future[CallerTunnel | Reply | str]
        answer = self.answer = asyncio.get_running_loop().create_future()
        self.inbox = fast.open_inbox(self._on_inbox)
        hdr = b"%s%s: %s\r\n%s: %s\r\n\r\n" % (
            head,
            protocol.H_STREAM.encode(),
            call.encode(),
            codec.H_UPGRADE.encode(),
            WEBSOCKET.encode(),
        )
        if not fast.publish_block(subject.encode(), self.inbox, hdr, b""):
            self._stop()
            return UNAVAILABLE
        try:
            result = await asyncio.wait_for(asyncio.shield(answer), timeout_s)
        except TimeoutError:
            self.cut("no answer to the upgrade in time", transport=False)
            return TIMEOUT
        finally:
            self.answer = None
        if result is not self and not self.finished:
            self.finished = True
            self._stop()
        return result

    def limit_body(self, limit: int) -> bool:
        """An upgrade has no body to limit (a route's maxBodyBytes is for requests)."""
        return False

    def _on_inbox(self, msg: Reply | str) -> None:
        if isinstance(msg, str):
            self._settle(UNAVAILABLE)
            self.cut("NATS connection lost", tell=False)
        else:
            self.on_message(msg)

    def cut(self, reason: str, *, tell: bool = True, transport: bool = True) -> None:
        # Before the 101 reached the client, its connection is the outbound
        # handler's to answer (502, 503...): only a tunnel in use resets it.
        super().cut(reason, tell=tell, transport=transport and self.receiver is not None)
        self._settle("bad_stream")

    def _settle(self, result: CallerTunnel | Reply | str) -> bool:
        answer = self.answer
        if answer is None or answer.done():
            return False
        answer.set_result(result)
        return True

    def handle(self, what: str, msg: Reply) -> None:
        if what == protocol.HEAD:
            self._on_head(msg)
        elif what == protocol.FINAL:
            if not self._settle(msg):
                raise protocol.StreamError("a reply after the tunnel opened")
        elif what == protocol.NO_RESPONDERS and self._settle("noResponders"):
            pass  # nobody serves the service: the handler answers 503
        else:
            super().handle(what, msg)

    def _on_head(self, msg: Reply) -> None:
        hdrs = msg.headers
        if self.status or hdrs.get(protocol.H_STREAM) != self.call:
            raise protocol.StreamError("a second head, or another call's")
        if hdrs.get(protocol.H_STREAM_STATUS) != "101":
            raise protocol.StreamError("a streamed head other than 101 for an upgrade")
        self.status = 101
        self.response_headers = hdrs
        if not self._settle(self):
            raise protocol.StreamError("a head after the caller stopped waiting")
        self._arm()

    def _first_credit(self, msg: Reply, credit: int) -> None:
        if msg.headers.get(protocol.H_STREAM) != self.call or not self.status:
            raise protocol.StreamError("credit before the upgrade, or for another call")
        fast, subject = self.fast, self.call_subject
        # With our inbox as reply: a callee gone answers "no responders"
        # (not across namespaces: each would open a reply mapping there).
        inbox = b"" if self.crossing else self.inbox
        assert fast is not None

        def publish(block: bytes, payload: bytes) -> bool:
            return fast.publish_block(subject, inbox, block, payload)

        self._joined(publish, credit)

    def _tell(self, block: bytes, *, credit: bool = False) -> None:
        fast = self.fast
        if fast is not None and self.call_subject:
            reply = self.reply_to_callee(self.inbox, credit=credit)
            fast.publish_block(self.call_subject, reply, block, b"")

    def attach(self, conn: _Conn, req: object, done: object) -> None:
        """Take the client's socket over from ``conn``: the 101 now, then the bytes."""
        transport = conn.transport
        if self.finished or conn.closed or transport is None:
            self.client_lost()
            if transport is not None:
                transport.abort()
            return
        # The socket is the tunnel's now: the connection forgets it.
        conn.stream = None
        conn.closed = True
        conn.server.connections.discard(conn)
        transport.set_protocol(self)
        block, _ = codec.http_block(self.response_headers)
        transport.write(b"HTTP/1.1 101 Switching Protocols\r\n%s%s\r\n" % (block, _UPGRADE_HEADERS))
        receiver = self.receiver = Receiver(
            self.limits.window,
            deliver=self._write,
            finish=self._peer_eof,
            send_credit=self._send_credit,
        )
        self._send_credit(receiver.open())
        if not self.sender.paused:
            transport.resume_reading()

    def writable(self, ok: bool) -> None:
        """The outbound connection's pause_writing/resume_writing, before the 101."""
        if ok:
            self.resume_writing()
        else:
            self.pause_writing()

    def client_lost(self) -> None:
        """The client went away before the 101 was written."""
        self._settle("cut")
        self.cut("the client went away", transport=False)

    def _stop(self) -> None:
        super()._stop()
        if self.fast is not None and self.inbox:
            self.fast.close_inbox(self.inbox)


# -- the callee's side ----------------------------------------------------------------------


class CalleeTunnel(_End):
    """The sidecar's own connection to the app for one upgrade.

    Parses the app's answer; on 101 becomes a pipe (the parser dropped),
    otherwise relays the answer as a unary reply and closes.
    """

    __slots__ = (
        "answers",
        "body",
        "call",
        "call_subject",
        "headed",
        "headers",
        "parser",
        "sub",
    )

    side = "app"

    def __init__(self, limits: StreamLimits) -> None:
        super().__init__(limits)
        self.answers: Answers | None = None
        self.call = ""
        self.call_subject = ""
        self.sub: Any = None
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.headers: list[tuple[str, str]] = []
        #: A refusal's body, from its head on (None before).
        self.body: list[bytes] | None = None
        #: (status, error code) once the answer is relayed or the tunnel broke.
        self.headed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    def bind(self, fast: FastPath, msg: Reply, call: str) -> bool:
        subject = protocol.call_subject(msg.subject, call)
        if subject is None:
            return False
        self.fast = fast
        self.answers = Answers(fast, msg.reply, msg.subject.rsplit(".", 1)[-1])
        self.crossing = self.answers.once
        self.call, self.call_subject = call, subject
        return True

    async def open(self) -> None:
        """Subscribe to the call's subject (before anything tells the caller of it)."""
        assert self.fast is not None
        self.sub = await self.fast.subscribe(self.call_subject, "", self.on_message)

    # -- the app's answer ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            super().data_received(data)
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._switched(data[exc.args[0] :])
        except (httptools.HttpParserError, ValueError) as exc:
            self._refused(502, "app_bad_response", f"malformed answer to the upgrade: {exc}")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))
        if len(self.headers) > 256:
            raise ValueError("too many headers")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code() if self.parser is not None else 0
        if status >= 200:
            self.body = []
        elif status != 101:
            self.headers = []  # an interim answer (100 Continue): the real one follows

    def on_body(self, body: bytes) -> None:
        if self.body is not None:
            self.body.append(body)
            if sum(map(len, self.body)) > self.limits.chunk_bytes:
                raise ValueError("a refusal longer than one chunk")

    def on_message_complete(self) -> None:
        parser = self.parser
        if parser is None:
            return
        status = parser.get_status_code()
        if status >= 200:
            self._answered(status)
        # 101: the parser raises HttpParserUpgrade next (or it was not one: see _switched).

    def _answered(self, status: int) -> None:
        """Any answer but 101: relayed as a unary reply, the app's connection closed."""
        self.parser = None
        if self.answers is not None:
            head = f"NATS/1.0\r\n{codec.nats_lines(self.headers)}Nm-Status: {status}\r\n\r\n"
            body = b"".join(self.body or ())
            self.answers.send(head.encode("utf-8", "replace"), body)
        self.body = None
        self.finished = True
        self._stop()
        if self.transport is not None:
            self.transport.close()
        self._headed(status, "")

    def _refused(self, status: int, code: str, message: str) -> None:
        self.parser = None
        if self.answers is not None and not self.headed.done():
            self.answers.send(*unary_block(status, code, message))
        self._headed(status, code)
        self.cut(message, tell=False)

    def _switched(self, rest: bytes) -> None:
        """The app switched protocols: tell the caller, then pipe."""
        parser, self.parser = self.parser, None
        if parser is None or parser.get_status_code() != 101:
            self._refused(502, "app_bad_response", "the app upgraded without a 101")
            return
        answers = self.answers
        assert answers is not None
        head = (
            f"NATS/1.0\r\n{codec.nats_lines(self.headers)}{protocol.H_STREAM}: {self.call}\r\n"
            f"{protocol.H_STREAM_STATUS}: 101\r\n\r\n"
        )
        self.headers = []
        answers.send(head.encode("utf-8", "replace"))
        receiver = self.receiver = Receiver(
            self.limits.window,
            deliver=self._write,
            finish=self._peer_eof,
            send_credit=self._send_credit,
        )
        ready = protocol.block((protocol.H_STREAM, self.call), (protocol.H_CREDIT, receiver.open()))
        # Across namespaces it waits for the caller's first credit (Answers).
        answers.send(ready, b"", self.call_subject.encode())
        self._arm()
        if rest:
            self.sender.feed(rest)
        self._headed(101, "")

    def eof_received(self) -> bool:
        parser = self.parser
        if parser is None:
            return super().eof_received()
        if self.body is not None:
            # An answer whose body ends at the close.
            self._answered(parser.get_status_code())
        else:
            self._refused(502, "app_unreachable", "the app closed before answering")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.parser is not None:
            self._refused(502, "app_unreachable", "the app closed before answering")
        super().connection_lost(exc)

    def _headed(self, status: int, code: str) -> None:
        if not self.headed.done():
            self.headed.set_result((status, code))

    # -- the caller ----------------------------------------------------------------------

    def _first_credit(self, msg: Reply, credit: int) -> None:
        answers, own = self.answers, self.call_subject.encode()
        if self.receiver is None or answers is None:
            raise protocol.StreamError("credit before the upgrade")
        answers.bind(msg.reply)

        def publish(block: bytes, payload: bytes) -> bool:
            # With our call subject as reply: a caller gone answers "no responders".
            return answers.send(block, payload, own)

        self._joined(publish, credit)

    def _tell(self, block: bytes, *, credit: bool = False) -> None:
        if self.answers is not None:
            self.answers.send(block, b"", self.call_subject.encode())

    def cut(self, reason: str, *, tell: bool = True, transport: bool = True) -> None:
        self.parser = None
        super().cut(reason, tell=tell, transport=transport)
        self._headed(502, "tunnel_cut")

    def _stop(self) -> None:
        super()._stop()
        sub, self.sub = self.sub, None
        drop_subscription(self.fast, sub)
        if self.answers is not None:
            self.answers.close()


async def serve(
    msg: Reply,
    request: Callable[[int | None], bytes | None],
    *,
    fast: FastPath,
    limits: StreamLimits,
    app_host: str,
    app_port: int,
    may_subscribe: Callable[[str], bool],
    timeout_s: float,
) -> tuple[int, str]:
    """Serve one upgrade head; (status, error code) once the app answered.

    ``request(0)`` renders the request head for the app (inbound's, as for a
    streamed upload: the same signature as :func:`.callee.serve_upload`).
    """
    call = msg.headers.get(protocol.H_STREAM, "")
    rendered = request(0)
    hdrs = msg.headers
    if (
        rendered is None
        or hdrs.get(codec.H_STREAM_METHOD) != "GET"
        or (hdrs.get(codec.H_UPGRADE) != WEBSOCKET)
    ):
        unary_reply(fast, msg.reply, 400, "bad_request", "invalid upgrade request")
        return 400, "bad_request"
    # The body is empty: its length line makes way for the upgrade's.
    head = rendered.replace(b"content-length: 0\r\n\r\n", b"%s\r\n" % _UPGRADE_HEADERS, 1)
    tunnel = CalleeTunnel(limits)
    if not streamable(msg, may_subscribe) or not tunnel.bind(fast, msg, call):
        code = "upgrade_not_supported"
        unary_reply(fast, msg.reply, 501, code, "this callee cannot tunnel a WebSocket")
        return 501, code
    await tunnel.open()
    try:
        await asyncio.get_running_loop().create_connection(lambda: tunnel, app_host, app_port)
    except OSError as exc:
        tunnel.cut(f"app unreachable: {exc}", tell=False)
        why = f"app unreachable: {exc.strerror or exc}"
        unary_reply(fast, msg.reply, 502, "app_unreachable", why)
        return 502, "app_unreachable"
    assert tunnel.transport is not None
    tunnel.transport.write(head)
    try:
        return await asyncio.wait_for(asyncio.shield(tunnel.headed), timeout_s)
    except TimeoutError:
        unary_reply(fast, msg.reply, 504, "app_timeout", "the app did not answer the upgrade")
        tunnel.cut("the app did not answer the upgrade in time", tell=False)
        return 504, "app_timeout"
