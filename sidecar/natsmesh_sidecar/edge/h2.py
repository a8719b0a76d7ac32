"""HTTP/2 cleartext on the outbound listener (h2c with prior knowledge): gRPC's way in.

Imported only when a connection opens with the HTTP/2 preface: the listener's
HTTP/1.1 parser stops on ``PRI * HTTP/2.0`` and hands the socket over
(:func:`take_over`), so the HTTP/1.1 path and a sidecar that never sees
HTTP/2 pay nothing, not even the ``h2`` import.

Each HTTP/2 stream is one call, routed exactly like an HTTP/1.1 request
(``:authority`` names the service as ``Host:`` does, ``:path`` is what a
NatsRoute matches: ``/package.Service/Method`` for gRPC) and always carried
as a streamed call (natsmesh_sidecar.transport.stream): the request's DATA
frames are its upload, the response comes back as a stream whose last
message carries the trailers (``Nm-Trailers``, natsmesh_sidecar.edge.grpcwire).
So unary, server-, client- and bidirectional streaming calls all take the
same way, and both directions are flow controlled end to end: HTTP/2
WINDOW_UPDATEs go to the client only while the stream's sender keeps up,
and stream credit goes to the callee only while the client's window lets
the response's DATA out.

A gRPC call (``content-type: application/grpc...``) is answered in gRPC's
terms: a mesh refusal is a trailers-only response with ``grpc-status``
(natsmesh_sidecar.edge.grpcwire.status_of), ``grpc-timeout`` cuts the call
at its deadline, and a client's RST_STREAM aborts the callee's side (its
app sees the call cancelled).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from natsmesh_sidecar import codec
from natsmesh_sidecar.edge import grpcwire
from natsmesh_sidecar.edge.h2app import FrameWriter, GracefulH2, send_within_window
from natsmesh_sidecar.edge.request import (
    _FORWARD,
    _HOST,
    _SPECIAL_ONLY,
    Handler,
    Request,
    StreamedRequest,
    _name,
)
from natsmesh_sidecar.transport.natsfast import TIMEOUT, Reply
from natsmesh_sidecar.transport.stream import protocol
from natsmesh_sidecar.transport.stream.caller import CallerStream

if TYPE_CHECKING:
    from natsmesh_sidecar.wire import StreamLimits

logger = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: What the HTTP/1.1 parser consumed of the preface when it stopped.
_PRI_LINE = PREFACE[:18]
#: Our receive windows: the client may send this much per stream (and, all
#: streams together, per connection) before our WINDOW_UPDATE.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 4 * 1024 * 1024
MAX_STREAMS = 256
#: What a client that went away is answered in the access log and metrics
#: (natsmesh_sidecar.policy.resilience.CANCELLED; the edge may not import policy).
CANCELLED = "cancelled"


class Server(Protocol):
    """What this module uses of natsmesh_sidecar.edge.listener.OutboundServer
    (which imports this module: a Protocol, not an import)."""

    @property
    def handler(self) -> Handler: ...
    @property
    def stream_limits(self) -> StreamLimits: ...
    @property
    def max_header_bytes(self) -> int: ...
    @property
    def idle_timeout(self) -> float: ...
    @property
    def header_timeout(self) -> float: ...
    @property
    def draining(self) -> bool: ...
    @property
    def connections(self) -> set[Any]: ...


class Listening(Protocol):
    """What this module uses of the HTTP/1.1 connection it takes over."""

    @property
    def server(self) -> Server: ...
    @property
    def transport(self) -> asyncio.Transport | None: ...


def take_over(conn: Listening, data: bytes) -> None:
    """The listener's parser met the HTTP/2 preface in ``data``: this socket speaks HTTP/2 now.

    The parser stopped right after the preface's first 18 bytes, which ended
    somewhere in ``data``: what follows them there is fed to HTTP/2.
    """
    server, transport = conn.server, conn.transport
    assert transport is not None
    h = H2Server(server)
    server.connections.discard(conn)
    server.connections.add(h)
    transport.set_protocol(h)
    h.connection_made(transport)
    h.data_received(_PRI_LINE + after_preface_line(data))


def after_preface_line(data: bytes) -> bytes:
    """What follows, in the read that ended it, the preface's first 18 bytes
    (``PRI * HTTP/2.0``, where the HTTP/1.1 parser stops; they may have
    come over several reads)."""
    k = min(len(data), len(_PRI_LINE))
    while k and not _PRI_LINE.endswith(data[:k]):
        k -= 1
    return data[k:]


class _Flow:
    """What the upload's sender pauses: the WINDOW_UPDATEs of one stream."""

    __slots__ = ("conn", "paused", "stream_id", "unacked")

    def __init__(self, conn: H2Server, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.paused = False
        self.unacked = 0

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        if self.unacked:
            n, self.unacked = self.unacked, 0
            self.conn.ack(self.stream_id, n)


class H2Stream(CallerStream):
    """One HTTP/2 stream's call: the caller's stream end, answering on HTTP/2."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.h2: H2Server | None = None
        self.stream_id = 0
        self.flow: _Flow | None = None
        #: The response's head went to the client; DATA waiting for its window.
        self.attached = False
        self.out: collections.deque[bytes] = collections.deque()
        #: The response is complete: trailers (or END_STREAM) once ``out`` drained.
        self.ending = False
        self.closed_h2 = False
        self.deadline: asyncio.TimerHandle | None = None
        #: The ``grpc-status`` the client was sent (at the end, the call's label).
        self.sent_status: int | None = None

    def replay(self) -> CallerStream:
        """Another try of the call on the same HTTP/2 stream: its DATA goes to
        the fresh stream from now on, and so does its deadline."""
        deadline, self.deadline = self.deadline, None
        fresh = cast(H2Stream, super().replay())
        fresh.h2, fresh.stream_id, fresh.flow = self.h2, self.stream_id, self.flow
        conn = self.h2
        if conn is not None and conn.calls.get(self.stream_id) is self:
            conn.calls[self.stream_id] = fresh
        if deadline is not None:
            deadline.cancel()
            fresh.deadline = asyncio.get_running_loop().call_at(deadline.when(), fresh.expire)
        return fresh

    def ended(self, status: int | None) -> None:
        """The call is over for its client: counted once, with the gRPC status it got."""
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end(grpcwire.UNKNOWN if status is None else status)

    # -- from the callee -----------------------------------------------------------

    def on_message(self, msg: Reply) -> None:
        if protocol.H_EOF in msg.headers and grpcwire.H_TRAILERS in msg.headers:
            self.trailers = grpcwire.decode_trailers(msg.headers[grpcwire.H_TRAILERS])
        super().on_message(msg)

    def attach_h2(self) -> None:
        """The response head is in: HEADERS now, DATA as it comes, then the trailers."""
        conn = self.h2
        if conn is None or self.closed_h2:
            return
        if self.finished and not self.complete:
            conn.fail(self, grpcwire.UNAVAILABLE, "the call was cut")
            return
        self.attached = True
        headers = [(":status", str(self.status)), *_response_headers(self.response_headers)]
        if self.length is not None:
            headers.append(("content-length", str(self.length)))
        pending, self.pending = self.pending, []
        if self.complete and not any(pending) and not self.trailers:
            # Trailers-only: what a gRPC server answers an error with.
            self._abort_upload("the response ended before the body was sent")
            self.finished = True
            self._stop()
            conn.send_headers(self, headers, end=True)
            return
        conn.send_headers(self, headers, end=False)
        for data in pending:
            self._write(data)
        if self.complete:
            self._finished()

    def _write(self, data: bytes) -> None:
        if not self.attached:
            self.pending.append(data)
            return
        self.bytes_out += len(data)
        self.out.append(data)
        if self.h2 is not None:
            self.h2.flush(self)

    def _finished(self) -> None:
        self.complete = True
        if not self.attached or self.finished:
            return
        self._abort_upload("the response ended before the body was sent")
        self.finished = True
        self._stop()
        self.ending = True
        if self.h2 is not None:
            self.h2.flush(self)

    def cut(self, reason: str, *, answer: str = "cut") -> None:
        if self.finished:
            return
        super().cut(reason, answer=answer)  # the callee told; no HTTP/1.1 connection to reset
        if self.attached and self.h2 is not None:
            status = grpcwire.DEADLINE_EXCEEDED if answer == TIMEOUT else grpcwire.UNAVAILABLE
            self.h2.fail(self, status, reason)

    def client_lost(self) -> None:
        """The client reset the stream (a cancel) or went away: the callee is told."""
        self._stop_deadline()
        self.ended(grpcwire.CANCELLED)  # once answered, it was counted already
        if self.finished:
            return
        super().client_lost()
        # The call waiting on its head ends now, not at its timeout.
        self._answer(CANCELLED)

    def expire(self) -> None:
        """``grpc-timeout`` passed: the callee's app is cancelled, the client told."""
        self.deadline = None
        self.expired = True
        self.cut("the call's grpc-timeout passed", answer=TIMEOUT)

    def _stop_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None


def _response_headers(hdrs: dict[str, str]) -> list[tuple[str, str]]:
    out = []
    for name, value in codec.nats_to_http(hdrs):
        low = name.lower()
        if low in codec.HOP_BY_HOP or low == "host" or low.startswith(":"):
            continue
        if codec.valid_header(low.encode("latin-1", "replace"), value.encode("latin-1", "replace")):
            out.append((low, value))
    return out


def _trailer_headers(trailers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [
        (n, v)
        for n, v in trailers
        if not n.startswith(":")
        and n not in codec.HOP_BY_HOP
        and codec.valid_header(n.encode("latin-1", "replace"), v.encode("latin-1", "replace"))
    ]


class H2Server(FrameWriter):
    """One client's HTTP/2 connection: its streams, each a call."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.handler = server.handler
        self.limits = server.stream_limits
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = GracefulH2(config=config)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: server.max_header_bytes,
            },
        )
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, H2Stream] = {}
        self.closed = False
        #: The client said GOAWAY (NO_ERROR): close once its open calls are answered.
        self.going = False
        self.last = time.monotonic()
        #: The client's first bytes until they are the whole preface (then None):
        #: nothing of HTTP/2 is said to a client that only looked like one.
        self.preface: bytes | None = b""
        #: The listener's sweep and drain ask these of every connection.
        self.queue: tuple[()] = ()

    @property
    def busy(self) -> bool:
        return bool(self.calls)

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call.closed_h2 = True
            call.client_lost()

    def data_received(self, data: bytes) -> None:
        self.last = time.monotonic()
        if self.preface is not None:
            got = self.preface + data
            if not got.startswith(PREFACE):
                if PREFACE.startswith(got):
                    self.preface = got  # more to come
                    return
                self._not_http2()
                return
            self.preface = None
            self.h2.initiate_connection()
            self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
            data = got
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            logger.info("HTTP/2 client broke the protocol: %s", exc)
            self._close()
            return
        for event in events:
            try:
                self._event(event)
            except Exception:
                logger.exception("HTTP/2 event %s failed", type(event).__name__)
                sid = getattr(event, "stream_id", 0)
                if sid:
                    self._reset(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self._send()

    def _not_http2(self) -> None:
        """``PRI * HTTP/2.0`` but not the rest of the preface: an HTTP/1.1 400."""
        self.preface = None
        rid = codec.new_request_id()
        if self.transport is not None and not self.closed:
            self.transport.write(
                codec.render_response(
                    400,
                    [("content-type", "application/json"), ("x-request-id", rid)],
                    codec.error_body("bad_request", "malformed HTTP/2 preface", rid),
                    keep_alive=False,
                )
            )
            self.transport.close()

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._data(event)
        elif isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.StreamEnded):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call.end_body()
        elif isinstance(event, h2.events.StreamReset):
            call = self.calls.pop(event.stream_id, None)
            if call is not None:
                call.closed_h2 = True
                call.client_lost()
                self._idle()
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                found = self.calls.get(event.stream_id)
                if found is not None:
                    self.flush(found)
            else:
                self._flush_all()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                # Every stream's window moved by the difference, with no
                # WINDOW_UPDATE of its own (grpc-go's BDP estimator raises it so).
                self._flush_all()
        elif isinstance(event, h2.events.ConnectionTerminated):
            if event.error_code == h2.errors.ErrorCodes.NO_ERROR and self.calls:
                # A client closing gracefully opens nothing more but still
                # reads the answers of the calls it has open.
                self.going = True
            else:
                self._close()
        # Anything else (settings, pings, a request's trailers: gRPC clients
        # send none, and they are not carried) needs nothing of us.

    # -- a request -------------------------------------------------------------------

    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        pseudo: dict[bytes, bytes] = {}
        headers: list[tuple[str, str]] = []
        special: dict[str, str] = {}
        for name, value in event.headers or ():
            n, v = bytes(name), bytes(value)
            if n.startswith(b":"):
                pseudo[n] = v
                continue
            _, low, kind = _name(n)
            if kind == _FORWARD:
                headers.append((low, v.decode("latin-1")))
            elif kind in (_SPECIAL_ONLY, _HOST):
                text = v.decode("latin-1")
                special[low] = text
                if kind == _HOST:
                    headers.append((low, text))
        method = pseudo.get(b":method", b"").decode("latin-1")
        path = pseudo.get(b":path", b"").decode("latin-1")
        authority = pseudo.get(b":authority", b"").decode("latin-1")
        if authority and "host" not in special:
            special["host"] = authority
            headers.append(("host", authority))
        grpc = grpcwire.is_grpc(special.get("content-type"))
        length_text = special.get("content-length", "")
        length = int(length_text) if length_text.isdigit() else None
        flow = _Flow(self, sid)
        call = H2Stream.for_upload(
            self.limits, cast(asyncio.Transport, flow), keep_alive=True, length=length
        )
        assert isinstance(call, H2Stream)
        call.h2, call.stream_id, call.flow, call.grpc = self, sid, flow, grpc
        self.calls[sid] = call
        if method == "CONNECT" or not path.startswith("/"):
            self.refuse(
                call, 400, "bad_request", "HTTP/2 CONNECT and non-path targets are not carried"
            )
            return
        req = StreamedRequest(method, path, special.get("host", ""), headers, special, b"", True)
        req.stream = call
        if grpc:
            deadline = grpcwire.timeout_seconds(_get(headers, "grpc-timeout"))
            if deadline is not None:
                call.deadline = asyncio.get_running_loop().call_later(deadline, call.expire)
        if event.stream_ended is not None:
            call.end_body()
        resp = self.handler.start(req, self._answered)
        if resp is not None:
            self._answered(req, resp)

    def _data(self, event: h2.events.DataReceived) -> None:
        sid, n = event.stream_id, event.flow_controlled_length
        call = self.calls.get(sid)
        if call is None or call.flow is None:
            self.ack(sid, n)
            return
        if event.data:
            call.feed(event.data)
        if call.flow.paused:
            call.flow.unacked += n
        else:
            self.ack(sid, n)

    def ack(self, sid: int, n: int) -> None:
        if n and not self.closed:
            self.h2.acknowledge_received_data(n, sid)
            self._send()

    def _flush_all(self) -> None:
        for call in list(self.calls.values()):
            if call.out or call.ending:
                self.flush(call)

    # -- answers ------------------------------------------------------------------------

    def _answered(self, req: Request, resp: bytes | CallerStream) -> None:
        """The handler's answer: a stream (its head is in), a whole response, or b"" (done)."""
        call = cast(StreamedRequest, req).stream
        assert isinstance(call, H2Stream)
        if resp.__class__ is not bytes:
            if resp is not call:
                logger.error("HTTP/2 stream %d answered by another stream", call.stream_id)
                self._reset(call.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                return
            call.attach_h2()
            self._send()
            return
        if resp and not call.closed_h2:
            self._relay(call, resp)
            self._send()

    def _relay(self, call: H2Stream, whole: bytes) -> None:
        """A whole HTTP/1.1 response (a refusal, rendered by the handler) on HTTP/2."""
        head, _, body = whole.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0][9:12])
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, _, value = line.partition(b": ")
            low = name.decode("latin-1").lower()
            if low not in codec.HOP_BY_HOP:
                headers.append((low, value.decode("latin-1")))
        code, message = "", ""
        if body.startswith(b"{"):
            try:
                parsed = json.loads(body)
                code, message = str(parsed.get("error", "")), str(parsed.get("message", ""))
            except (ValueError, AttributeError):
                pass
        if call.grpc:
            grpc_status = grpcwire.status_of(status, code)
            if call.expired:
                # Cut at its deadline wherever the call was (waiting, planned, sent).
                grpc_status, message = grpcwire.DEADLINE_EXCEEDED, "the call's grpc-timeout passed"
            self.refuse_grpc(
                call, grpc_status, message or code, code, _get(headers, "x-request-id")
            )
            return
        headers.append(("content-length", str(len(body))))
        self.send_headers(call, [(":status", str(status)), *headers], end=not body)
        if body:
            call.attached = True
            call.out.append(body)
            call.ending = True
            self.flush(call)

    def refuse(self, call: H2Stream, status: int, code: str, message: str) -> None:
        """A refusal before routing (a malformed request)."""
        rid = codec.new_request_id()
        self._relay(
            call,
            codec.render_response(
                status,
                [("content-type", "application/json"), ("x-request-id", rid)],
                codec.error_body(code, message, rid),
                keep_alive=True,
            ),
        )
        call.client_lost()  # nothing was sent: only the deadline to stop

    def refuse_grpc(
        self, call: H2Stream, status: int, message: str, code: str = "", rid: str | None = None
    ) -> None:
        """A trailers-only gRPC response: HTTP 200 and ``grpc-status``."""
        headers = [
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", str(status)),
            ("grpc-message", grpcwire.message(message)),
        ]
        if code:
            headers.append(("x-natsmesh-error", code))
        if rid:
            headers.append(("x-request-id", rid))
        self.send_headers(call, headers, end=True)

    def fail(self, call: H2Stream, status: int, reason: str) -> None:
        """A stream cut once its response began: gRPC trailers with ``status``, else a reset."""
        if call.closed_h2:
            return
        if call.grpc:
            call.out.clear()
            call.trailers = [
                ("grpc-status", str(status)),
                ("grpc-message", grpcwire.message(reason)),
            ]
            call.ending = True
            self.flush(call)
        else:
            self._reset(call.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self._send()

    # -- writing ----------------------------------------------------------------------

    def send_headers(self, call: H2Stream, headers: list[tuple[str, str]], *, end: bool) -> None:
        if call.closed_h2 or self.closed:
            return
        try:
            self.h2.send_headers(call.stream_id, headers, end_stream=end)
        except h2.exceptions.H2Error as exc:
            logger.info("HTTP/2 stream %d: %s", call.stream_id, exc)
            self._reset(call.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            return
        if end:
            call.sent_status = grpcwire.status_in(headers)
            self._done(call)
        self._send()

    def flush(self, call: H2Stream) -> None:
        """DATA within the client's window; the trailers once all of it went."""
        if call.closed_h2 or self.closed:
            return
        sid, out = call.stream_id, call.out
        try:
            send_within_window(self.h2, sid, out)
            receiver = call.receiver
            if receiver is not None and not receiver.done:
                # Credit to the callee only while the client's window lets DATA out.
                blocked = bool(out)
                if blocked != receiver.blocked:
                    receiver.set_blocked(blocked)
            if call.ending and not out:
                trailers = _trailer_headers(call.trailers)
                if trailers:
                    self.h2.send_headers(sid, trailers, end_stream=True)
                else:
                    self.h2.end_stream(sid)
                call.sent_status = grpcwire.status_in(trailers)
                self._done(call)
        except h2.exceptions.H2Error as exc:
            logger.info("HTTP/2 stream %d: %s", sid, exc)
            self._reset(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self._send()

    def _done(self, call: H2Stream) -> None:
        call.closed_h2 = True
        call._stop_deadline()
        call.ended(call.sent_status)
        if self.calls.get(call.stream_id) is call:
            del self.calls[call.stream_id]
        if not call.finished:
            # Answered before its request ended (a refusal): the callee has nothing of it.
            call.client_lost()
        self._idle()

    def _reset(self, sid: int, code: h2.errors.ErrorCodes) -> None:
        call = self.calls.pop(sid, None)
        if call is not None:
            call.closed_h2 = True
            call.client_lost()
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.reset_stream(sid, code)
        self._send()
        self._idle()

    def _idle(self) -> None:
        self.last = time.monotonic()
        if (self.server.draining or self.going) and not self.calls:
            self._close()

    def _close(self) -> None:
        if self.preface is not None:
            self._not_http2()
            return
        if self.transport is not None and not self.closed:
            try:
                self.h2.close_connection()
                self._flush()
            except h2.exceptions.H2Error:
                pass
            self.transport.close()

    def sweep(self, now: float) -> None:
        """The listener's periodic sweep: an idle connection is closed."""
        if self.preface is not None and now - self.last > self.server.header_timeout:
            self._not_http2()  # a preface that stalls half-way: slowloris again
        elif not self.calls and now - self.last > self.server.idle_timeout:
            self._close()


def _get(headers: list[tuple[str, str]], wanted: str) -> str | None:
    for name, value in headers:
        if name == wanted:
            return value
    return None
