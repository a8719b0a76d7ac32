"""HTTP/2 to the app (h2c, prior knowledge): the callee's end of a gRPC call.

Used when the sidecar's NatsService says ``protocol: grpc``
(``NATSMESH_APP_PROTOCOL``); loaded with the first such call. A gRPC caller's
sidecar always streams (natsmesh_sidecar.edge.h2), so every call arrives as
a streamed head (natsmesh_sidecar.calls.inbound hands it to :meth:`AppH2.serve`):
it becomes one stream on a connection to the app that all calls share
(HTTP/2 multiplexes; a new one is opened when it is lost or going away).

Both directions are flow controlled end to end: the request's chunks are
written within the app's HTTP/2 window (no credit to the caller while some
wait), and the app's DATA is acknowledged only while the response's sender
keeps up with the caller's credit. The app's trailers travel on the
response's last message (``Nm-Trailers``, natsmesh_sidecar.edge.grpcwire);
the caller's abort resets the app's stream with CANCEL, which a gRPC server
sees as the call cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import Frame, GoAwayFrame

from natsmesh_sidecar import codec
from natsmesh_sidecar.edge import grpcwire
from natsmesh_sidecar.transport.natsfast import FastPath, Reply
from natsmesh_sidecar.transport.stream import protocol
from natsmesh_sidecar.transport.stream.callee import (
    CalleeStream,
    headed,
    streamable,
    unary_reply,
)
from natsmesh_sidecar.transport.stream.receiver import Receiver
from natsmesh_sidecar.wire import StreamLimits

if TYPE_CHECKING:
    from natsmesh_sidecar.transport.budget import Hold

logger = logging.getLogger(__name__)

#: What the app may send us per stream (and in all) before our WINDOW_UPDATE.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 4 * 1024 * 1024


class AppStream(CalleeStream):
    """The callee's stream end of one call, with the app's trailers on its last message."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        #: The ``Nm-Trailers`` header line, once the app sent its trailers.
        self.trailer = ""
        self._trailer_in_head = False
        #: The app's ``grpc-status`` (its trailers', or a trailers-only head's).
        self.app_status: int | None = None
        #: Told the call's gRPC status once it is over (the callee's metrics).
        self.on_end: Callable[[int], None] | None = None
        #: What the mesh answered instead of the app, if it did (a timeout).
        self.refused: int | None = None
        self.caller_left = False

    def ended(self, status: int | None = None) -> None:
        """The call is over: its status is the app's, else what ended it."""
        on_end, self.on_end = self.on_end, None
        if on_end is None:
            return
        if status is None:
            status = self.app_status
        if status is None:
            status = grpcwire.UNKNOWN if self.head_ready else grpcwire.UNAVAILABLE
            if self.refused is not None:
                status = self.refused
            elif self.caller_left:
                status = grpcwire.CANCELLED
        on_end(status)

    def final(self, status: int, code: str, message: str) -> None:
        self.refused = grpcwire.status_of(status, code)
        super().final(status, code, message)

    def aborted(self, reason: str) -> None:
        self.caller_left = True
        super().aborted(reason)

    def _publish_chunk(self, block: bytes, payload: bytes) -> bool:
        if self.trailer and block.endswith(b"Nm-Eof: 1\r\n\r\n"):
            block = block[:-2] + self.trailer.encode() + b"\r\n"
        return super()._publish_chunk(block, payload)

    def flush_head(self) -> None:
        sender = self.sender
        if (
            self.trailer
            and not self._trailer_in_head
            and not self.head_sent
            and sender.ended
            and sender.buffered <= self.limits.chunk_bytes
        ):
            # The whole response goes with the head (its Nm-Eof): so do the trailers.
            self._trailer_in_head = True
            self.lines += self.trailer
        super().flush_head()


class _Call:
    """One call's HTTP/2 stream to the app: the request written within the
    app's window, the response fed to the call's :class:`AppStream`."""

    __slots__ = ("conn", "ending", "out", "paused", "stream", "stream_id", "unacked")

    def __init__(self, conn: _AppConn, stream: AppStream) -> None:
        self.conn = conn
        self.stream = stream
        self.stream_id = 0
        self.out: collections.deque[bytes] = collections.deque()
        self.ending = False
        self.paused = False
        self.unacked = 0

    # The request body (the stream's receiver hands it on).
    def deliver(self, data: bytes) -> None:
        self.out.append(data)
        self.conn.flush(self)

    def finish(self) -> None:
        self.ending = True
        self.conn.flush(self)

    # The response body (the stream's sender pauses us).
    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        if self.unacked:
            n, self.unacked = self.unacked, 0
            self.conn.ack(self.stream_id, n)

    def close(self) -> None:
        """The caller aborted (or the stream broke): the app's call is cancelled."""
        self.conn.cancel(self)
        self.stream.ended()


class FrameWriter(asyncio.Protocol):
    """An HTTP/2 connection's writes: what its h2 state machine has to send
    goes out once per event-loop iteration, in one write.

    One callback often makes several frames (a unary gRPC call's response
    HEADERS, DATA and trailers; a request's DATA and END_STREAM), each
    written as it came before: a syscall each (docs/performance.md). What
    closes the connection writes first (:meth:`_flush`).
    """

    h2: h2.connection.H2Connection
    transport: asyncio.Transport | None
    closed: bool
    _flush_due = False

    def _send(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return
        data = self.h2.data_to_send()
        if data:
            transport.write(data)


class GracefulH2(h2.connection.H2Connection):
    """h2 takes any GOAWAY for the connection's end: it drops what it has to
    send and refuses every later frame, so the calls in flight were cut. A
    gRPC server's GOAWAY is graceful (grpc-go's ``MaxConnectionAge``,
    ``GracefulStop``: GOAWAY, a PING, the streams it took answered, a second
    GOAWAY naming the last of them, the close): those streams go on here,
    and no new one is opened (:attr:`_AppConn.going`). A client's GOAWAY
    with NO_ERROR is graceful too (natsmesh_sidecar.edge.h2: its open calls
    are answered, then the connection closes)."""

    def _receive_goaway_frame(
        self, frame: GoAwayFrame
    ) -> tuple[list[Frame], list[h2.events.Event]]:
        event = h2.events.ConnectionTerminated()
        try:
            event.error_code = h2.errors.ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class _AppConn(FrameWriter):
    """One HTTP/2 connection to the app."""

    def __init__(self, owner: AppH2) -> None:
        self.owner = owner
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = GracefulH2(config=config)
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, _Call] = {}
        self.closed = False
        #: The app said GOAWAY: no new streams here.
        self.going = False
        self.room = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.room.set()
        calls, self.calls = self.calls, {}
        for call in calls.values():
            self._lost(call, "the app closed its connection")

    def usable(self) -> bool:
        return not self.closed and not self.going

    def start(self, headers: Sequence[tuple[str, str]], stream: AppStream) -> _Call:
        """A new stream; its body follows as the caller's chunks arrive."""
        call = _Call(self, stream)
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers)
        call.stream_id = sid
        self.calls[sid] = call
        self._send()
        return call

    def full(self) -> bool:
        return self.h2.open_outbound_streams >= self.h2.remote_settings.max_concurrent_streams

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            logger.warning("the app broke HTTP/2: %s", exc)
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        touched: dict[int, _Call] = {}
        for event in events:
            sid = getattr(event, "stream_id", 0)
            call = self.calls.get(sid) if sid else None
            if isinstance(event, h2.events.DataReceived):
                n = event.flow_controlled_length
                if call is None:
                    self.ack(sid, n)
                    continue
                call.stream.feed(event.data)
                if call.paused:
                    call.unacked += n
                else:
                    self.ack(sid, n)
            elif isinstance(event, h2.events.WindowUpdated):
                for each in [call] if call is not None else list(self.calls.values()):
                    self.flush(each)
            elif call is None:
                if isinstance(event, h2.events.ConnectionTerminated):
                    self.going = True
                    last = event.last_stream_id or 0
                    for each in [c for sid, c in self.calls.items() if sid > last]:
                        self._forget(each)
                        self._lost(each, "the app went away before taking the call")
                elif isinstance(event, h2.events.RemoteSettingsChanged) and (
                    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings
                ):
                    # Every stream's window moved, with no WINDOW_UPDATE of its
                    # own: what grpc-go's BDP estimator does when it raises it.
                    for each in list(self.calls.values()):
                        self.flush(each)
                continue
            elif isinstance(event, h2.events.ResponseReceived):
                status, lines, length, grpc_status = _head(event.headers)
                call.stream.set_head(status, lines, length)
                call.stream.app_status = grpc_status
                if grpc_status is None and status != 200:
                    # Not a gRPC server's answer: what a gRPC client makes of the HTTP status.
                    call.stream.app_status = grpcwire.status_of(status)
            elif isinstance(event, h2.events.TrailersReceived):
                trailers = [
                    (bytes(n).decode("latin-1"), bytes(v).decode("latin-1"))
                    for n, v in event.headers or ()
                ]
                value = grpcwire.encode_trailers(trailers)
                call.stream.trailer = f"{grpcwire.H_TRAILERS}: {value}\r\n"
                call.stream.app_status = grpcwire.status_in(trailers)
            elif isinstance(event, h2.events.StreamEnded):
                self._forget(call)
                call.stream.end()
                call.stream.ended()
            elif isinstance(event, h2.events.StreamReset):
                self._forget(call)
                self._lost(call, f"the app reset the stream ({event.error_code!r})")
            if call is not None:
                touched[call.stream_id] = call
        for call in touched.values():
            call.stream.flush_head()
        self._send()

    def _lost(self, call: _Call, why: str) -> None:
        stream = call.stream
        if not stream.head_ready:
            stream.cut(why)
        else:
            stream.app_lost()
        # The caller is cut, or its client told UNAVAILABLE (edge.h2's fail).
        stream.ended(grpcwire.UNAVAILABLE)

    def _forget(self, call: _Call) -> None:
        if self.calls.pop(call.stream_id, None) is not None:
            self.room.set()

    def flush(self, call: _Call) -> None:
        """The request's DATA within the app's window; END_STREAM once all went."""
        if self.closed or (call.stream_id not in self.calls and not call.out and not call.ending):
            return
        sid, out = call.stream_id, call.out
        try:
            send_within_window(self.h2, sid, out)
            receiver = call.stream.receiver
            if receiver is not None and bool(out) != receiver.blocked:
                # No credit to the caller while the app's window holds DATA back
                # (and, after the last chunk, the byte budget counts what waits).
                receiver.set_blocked(bool(out))
            if call.ending and not out:
                call.ending = False
                self.h2.end_stream(sid)
        except h2.exceptions.H2Error as exc:
            # The app already answered and closed its side, or reset the stream.
            logger.debug("HTTP/2 stream %d to the app: %s", sid, exc)
            out.clear()
        self._send()

    def ack(self, sid: int, n: int) -> None:
        if n and not self.closed:
            self.h2.acknowledge_received_data(n, sid)
            self._send()

    def cancel(self, call: _Call) -> None:
        self._forget(call)
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.reset_stream(call.stream_id, h2.errors.ErrorCodes.CANCEL)
        self._send()


def send_within_window(
    conn: h2.connection.H2Connection, sid: int, out: collections.deque[bytes]
) -> None:
    """DATA frames from ``out`` while the peer's window for stream ``sid`` lasts;
    what does not fit stays in ``out`` (sent at its WINDOW_UPDATE)."""
    while out:
        window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        if window <= 0:
            return
        data = out[0]
        if len(data) > window:
            out[0] = data[window:]
            data = data[:window]
        else:
            out.popleft()
        conn.send_data(sid, data)


def _head(headers: Any) -> tuple[int, str, int | None, int | None]:
    """(status, NATS header lines, Content-Length, ``grpc-status`` of a
    trailers-only answer) of the app's response HEADERS."""
    status = 0
    length: int | None = None
    grpc_status: int | None = None
    out: list[tuple[str, str]] = []
    for name, value in headers or ():
        n, v = bytes(name).decode("latin-1"), bytes(value).decode("latin-1")
        if n == ":status":
            status = int(v) if v.isdigit() else 0
        elif n == "content-length" and v.isdigit():
            length = int(v)
        elif not n.startswith(":") and n not in codec.HOP_BY_HOP:
            out.append((n, v))
            if n == "grpc-status":
                grpc_status = grpcwire.status_value(v)
    return status, codec.nats_lines(out), length, grpc_status


class AppH2:
    """The app's HTTP/2 connection, opened on the first call and again once lost."""

    def __init__(self, host: str, port: int, authority: str) -> None:
        self.host = host
        self.port = port
        self.authority = authority
        self.conn: _AppConn | None = None
        self._lock = asyncio.Lock()

    async def connection(self) -> _AppConn:
        """A connection with room for one more stream; OSError if the app is unreachable."""
        while True:
            conn = self.conn
            if conn is not None and conn.usable():
                if not conn.full():
                    return conn
                conn.room.clear()
                await conn.room.wait()
                continue
            async with self._lock:
                if self.conn is conn:
                    loop = asyncio.get_running_loop()
                    _, made = await loop.create_connection(
                        lambda: _AppConn(self), self.host, self.port
                    )
                    self.conn = made

    async def serve(
        self,
        msg: Reply,
        request: Callable[[int | None], bytes | None],
        *,
        fast: FastPath,
        limits: StreamLimits,
        app_host: str,
        app_port: int,
        may_subscribe: Callable[[str], bool],
        timeout_s: float,
        on_end: Callable[[int], None] | None = None,
        hold: Hold | None = None,
    ) -> tuple[int, str]:
        """Serve one streamed call on HTTP/2; (status, error code) once the response head is out.

        Takes what natsmesh_sidecar.transport.stream.callee.serve_upload takes
        (the rendered HTTP/1.1 head ``request`` and the app's address are not
        used), and ``on_end``: told the call's gRPC status once, when it is
        over (the app's, or the mesh's answer instead), maybe before this returns.
        """
        hdrs = msg.headers
        call = hdrs.get(protocol.H_STREAM, "")
        try:
            length = protocol.length_of(hdrs)
        except protocol.StreamError:
            length = -1
        holder: list[_Call] = []

        def close_app() -> None:
            if holder:
                holder[0].close()

        stream = AppStream(
            limits,
            pause=lambda: holder[0].pause() if holder else None,
            resume=lambda: holder[0].resume() if holder else None,
            close_app=close_app,
        )
        if length == -1 or not streamable(msg, may_subscribe) or not stream.bind(fast, msg, call):
            unary_reply(
                fast, msg.reply, 413, "payload_too_large", "this callee cannot take a streamed body"
            )
            return _refused(on_end, 413, "payload_too_large")
        headers = self.request_headers(hdrs, length)
        if headers is None:
            unary_reply(fast, msg.reply, 400, "bad_request", "invalid method or target")
            return _refused(on_end, 400, "bad_request")
        await stream.open()
        try:
            conn = await self.connection()
        except OSError as exc:
            stream.cut(f"app unreachable: {exc}", tell=False)
            # Nothing reached the app (it is starting, or gone): the caller
            # may try another replica, as after no responders.
            unary_reply(
                fast, msg.reply, 502, "app_unreachable", f"app unreachable: {exc}", undelivered=True
            )
            return _refused(on_end, 502, "app_unreachable")
        try:
            app = conn.start(headers, stream)
        except h2.exceptions.H2Error as exc:
            stream.cut(f"app unreachable: {exc}", tell=False)
            unary_reply(fast, msg.reply, 502, "app_unreachable", f"app unreachable: {exc}")
            return _refused(on_end, 502, "app_unreachable")
        stream.on_end = on_end
        holder.append(app)
        stream.receiver = Receiver(
            limits.window,
            deliver=app.deliver,
            finish=app.finish,
            send_credit=stream.send_credit,
            length=length,
            hold=hold,
        )
        stream.send_ready(stream.receiver.open())
        return await headed(stream, timeout_s), ""

    def request_headers(
        self, hdrs: dict[str, str], length: int | None
    ) -> list[tuple[str, str]] | None:
        """The app's request HEADERS from a streamed head; None if not safe to send."""
        method = hdrs.get(codec.H_STREAM_METHOD, "")
        target = hdrs.get(codec.H_TARGET, "")
        if not codec.valid_method(method) or not target.startswith("/") or " " in target:
            return None
        authority = self.authority
        out: list[tuple[str, str]] = []
        for name, value in codec.nats_to_http(hdrs):
            low = name.lower()
            if low == "host":
                authority = value
            elif low not in codec.HOP_BY_HOP and codec.valid_header(
                low.encode("latin-1", "replace"), value.encode("latin-1", "replace")
            ):
                out.append((low, value))
        if length is not None:
            out.append(("content-length", str(length)))
        return [
            (":method", method),
            (":scheme", "http"),
            (":path", target),
            (":authority", authority),
            # gRPC servers ask for it: the client understands trailers.
            ("te", "trailers"),
            *out,
        ]


def _refused(on_end: Callable[[int], None] | None, status: int, code: str) -> tuple[int, str]:
    """A call the app never saw: its gRPC status told at once."""
    if on_end is not None:
        on_end(grpcwire.status_of(status, code))
    return status, code
