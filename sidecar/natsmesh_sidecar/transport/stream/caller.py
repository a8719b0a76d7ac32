"""The caller's sidecar end of a streamed call.

One :class:`CallerStream` per call whose request body or response body
streams. It is made

* by the outbound connection when a request body outgrows one message
  (:meth:`CallerStream.for_upload`): the client's bytes are fed in as they
  arrive, the client's socket paused while the callee grants no credit;
  :meth:`start_upload` sends the head and waits for the first answer;
* by the outbound handler when a reply says the response streams
  (:meth:`CallerStream.from_head`).

Either way, once the response head is in, the stream is handed to the
client connection as its answer (:meth:`attach`): the HTTP head goes out at
once (``Transfer-Encoding: chunked``, or the app's Content-Length), every
chunk as it arrives, and credit goes back only while the client's socket
keeps up. A stream that breaks (a gap, an abort, the callee silent past the
idle timeout, the NATS connection lost) resets the client's connection: an
incomplete body, never one that looks complete. A client that goes away
aborts the callee's side (the app sees its connection closed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from natsmesh_sidecar import codec
from natsmesh_sidecar.transport.natsfast import TIMEOUT, UNAVAILABLE, FastPath, Reply
from natsmesh_sidecar.transport.stream import protocol
from natsmesh_sidecar.transport.stream.peer import Peer
from natsmesh_sidecar.transport.stream.receiver import Receiver
from natsmesh_sidecar.transport.stream.sender import Sender
from natsmesh_sidecar.wire import StreamLimits

logger = logging.getLogger(__name__)


class Client(Protocol):
    """What the stream needs of the outbound connection it answers."""

    transport: asyncio.Transport | None
    stream: Any
    closed: bool


class CallerStream(Peer):
    def __init__(
        self, limits: StreamLimits, *, keep_alive: bool, length: int | None = None
    ) -> None:
        super().__init__(limits)
        self.keep_alive = keep_alive
        self.fast: FastPath | None = None
        self.request_subject = ""
        self.call = ""
        self.call_subject = b""
        self.inbox = b""
        #: The request body still coming from the client (uploads only).
        self.upload: Sender | None = None
        self.upload_length = length
        #: The route rule's maxBodyBytes (0: none), known once the request is routed.
        self.max_body = 0
        self.body_complete = True
        self.upload_sent_at = 0.0
        self.answer: asyncio.Future[CallerStream | Reply | str] | None = None
        # The response.
        self.status = 0
        self.response_headers: dict[str, str] = {}
        self.length: int | None = None
        self.pending: list[bytes] = []
        self.complete = False
        self.conn: Client | None = None
        self.req: Any = None
        self.done: Callable[[Any, Any], None] | None = None
        self.bytes_out = 0
        #: For the access log and metrics (the outbound handler sets them).
        self.destination = "-"
        self.route = "-"
        self.attempts = 1
        #: The response's trailers, from the stream's last message (gRPC: edge.h2).
        self.trailers: list[tuple[str, str]] = []
        #: A gRPC call (natsmesh_sidecar.edge.h2): counted at its end, with its
        #: gRPC status (``on_end``, set by the outbound handler).
        self.grpc = False
        self.on_end: Callable[[int], None] | None = None
        #: Its client's deadline passed (a cut that no retry may undo).
        self.expired = False
        #: A copy of the request body while it fits ``hold_limit`` (else None):
        #: what a retry sends again (:meth:`hold`, :meth:`replay`).
        self.held: list[bytes] | None = None
        self.held_bytes = 0
        self.hold_limit = 0

    # -- made by the outbound side ---------------------------------------------------

    @classmethod
    def for_upload(
        cls,
        limits: StreamLimits,
        transport: asyncio.Transport,
        *,
        keep_alive: bool,
        length: int | None,
    ) -> CallerStream:
        """A request whose body the client is still sending; fed by :meth:`feed`."""
        s = cls(limits, keep_alive=keep_alive, length=length)
        s.body_complete = False
        s.upload = Sender(
            limits.chunk_bytes,
            pause=transport.pause_reading,
            resume=transport.resume_reading,
            high=limits.chunk_bytes * max(2, limits.window // 2),
        )
        return s

    @classmethod
    def from_head(
        cls,
        fast: FastPath,
        limits: StreamLimits,
        request_subject: str,
        head: Reply,
        *,
        keep_alive: bool,
    ) -> CallerStream:
        """The stream a unary request's reply announced; raises StreamError if malformed."""
        s = cls(limits, keep_alive=keep_alive)
        s.fast = fast
        s.request_subject = request_subject
        s.crossing = protocol.crosses(request_subject)
        s.inbox = fast.open_inbox(s.on_inbox)
        try:
            s._on_head(head)
        except Exception:
            fast.close_inbox(s.inbox)
            raise
        s._arm()
        return s

    def feed(self, data: bytes) -> None:
        upload = self.upload
        if self.held is not None:
            self.held_bytes += len(data)
            if self.held_bytes > self.hold_limit:
                self.held = None  # too big to hold: this call is not retried
            else:
                self.held.append(data)
        if upload is not None and not self.finished:
            upload.feed(data)
            if self.max_body and upload.sent_bytes + upload.buffered > self.max_body:
                self._over_limit()

    def hold(self, limit: int) -> None:
        """Keep a copy of the request body while it is at most ``limit`` bytes,
        so that the call can be sent again (:meth:`replay`). Called before the
        upload starts: what came so far is all still in its buffer."""
        upload = self.upload
        if upload is None or upload.publish is not None:
            return
        self.hold_limit = limit
        self.held_bytes = upload.buffered
        self.held = list(upload.buf) if upload.buffered <= limit else None

    def replayable(self) -> bool:
        """Whether :meth:`replay` can send the request again: held whole so far."""
        return self.held is not None and self.upload is not None

    def replay(self) -> CallerStream:
        """A fresh stream for another try of this call: the held body fed again
        (and ended, if the client ended it), the rest of it to come as for
        this one. This stream is stopped; only call when :meth:`replayable`."""
        upload = self.upload
        assert self.held is not None
        assert upload is not None
        fresh = self.__class__(self.limits, keep_alive=self.keep_alive, length=self.upload_length)
        fresh.body_complete = False
        fresh.upload = Sender(
            self.limits.chunk_bytes, pause=upload.pause, resume=upload.resume, high=upload.high
        )
        fresh.max_body = self.max_body
        fresh.grpc, fresh.expired = self.grpc, self.expired
        fresh.hold(self.hold_limit)
        self.discard()
        for data in self.held:
            fresh.feed(data)
        if self.body_complete:
            fresh.end_body()
        return fresh

    def discard(self) -> None:
        """A try that will not be answered on: stopped, the callee told if it
        still waits for the body."""
        if not self.finished:
            self._abort_upload("the call is tried again")
            self.finished = True
            self._stop()

    def limit_body(self, limit: int) -> bool:
        """Hold the body to ``limit`` bytes (0: no limit); True, and the stream
        stopped, if it is over already (its Content-Length or what came)."""
        upload = self.upload
        if not limit or upload is None:
            return False
        self.max_body = limit
        over = (self.upload_length or 0) > limit or upload.sent_bytes + upload.buffered > limit
        if over:
            self.finished = True
            self._stop()
        return over

    def _over_limit(self) -> None:
        """A body (chunked: no length told) outgrew its limit on its way: the
        callee is told (its app sees the request cut) and the client gets 413,
        or a reset if its response had begun."""
        if self.conn is not None:
            self.cut("the request body outgrew the route's maxBodyBytes")
            return
        logger.info("stream %s: request body over %d bytes, cut", self.call or "-", self.max_body)
        # Told even before its first credit: the callee may be subscribed already.
        self._publish(protocol.abort_block("the request body outgrew the route's maxBodyBytes"))
        self.finished = True
        self._stop()
        self._answer("body_limit")

    def end_body(self) -> None:
        self.body_complete = True
        if self.upload is not None and not self.finished:
            self.upload.end()
            self._upload_progress()

    async def start_upload(
        self, fast: FastPath, subject: str, head: bytes, timeout_s: float
    ) -> CallerStream | Reply | str:
        """Send the head (``head``: the request's NATS header block less its
        blank line) and wait for the first answer.

        ``timeout_s`` (the route's) bounds the wait for the callee to take
        the stream and, once the body is sent, for the response head; while
        the body is being sent, the idle timeout does.
        """
        if self.finished:
            return "cut"  # the client left while the request waited its turn
        loop = asyncio.get_running_loop()
        self.fast = fast
        self.request_subject = subject
        self.crossing = protocol.crosses(subject)
        self.call = protocol.new_call_id()
        call_subject = protocol.call_subject(subject, self.call)
        if call_subject is None:
            return "bad_subject"
        self.call_subject = call_subject.encode()
        self.answer = loop.create_future()
        self.inbox = fast.open_inbox(self.on_inbox)
        hdr = head + b"Nm-Stream: %s\r\n" % self.call.encode()
        if self.upload_length is not None:
            hdr += b"Nm-Length: %d\r\n" % self.upload_length
        if not fast.publish_block(subject.encode(), self.inbox, hdr + b"\r\n", b""):
            self._close_inbox()
            return UNAVAILABLE
        self._arm()
        started = time.monotonic()
        idle = self.limits.idle_timeout_s
        while True:
            now = time.monotonic()
            upload = self.upload
            if upload is None or upload.publish is None:
                left = started + timeout_s - now  # the callee has not taken it yet
            elif not upload.eof_sent:
                left = self.last_heard + idle - now
            else:
                left = self.upload_sent_at + timeout_s - now
            if left <= 0:
                self.cut("no answer in time", answer=TIMEOUT)
                return TIMEOUT
            try:
                answer = await asyncio.wait_for(asyncio.shield(self.answer), left)
            except TimeoutError:
                continue
            if answer is not self and not self.finished:
                # Answered whole (a refusal, an error): nothing more will come.
                self._abort_upload("answered before the body was sent")
                self.finished = True
                self._stop()
            return answer

    # -- messages from the callee --------------------------------------------------------

    def on_inbox(self, msg: Reply | str) -> None:
        """What the inbox gets: a message, or the NATS connection's loss."""
        if isinstance(msg, str):
            self.cut("NATS connection lost", answer=UNAVAILABLE)
        else:
            self.on_message(msg)

    def handle(self, what: str, msg: Reply) -> None:
        if what == protocol.CREDIT:
            self._on_credit(msg.headers)
        elif what == protocol.HEAD:
            self._on_head(msg)
            self._answer(self)
        elif what == protocol.FINAL:
            if not self._answer(msg):
                raise protocol.StreamError("a unary reply to a streamed response")
        elif what == protocol.NO_RESPONDERS:
            if not self._answer("noResponders"):
                raise protocol.StreamError("no responders mid-stream")
        else:
            raise protocol.StreamError("unknown message on the stream")

    def aborted(self, reason: str) -> None:
        self.cut(f"callee aborted: {reason}", answer="aborted")

    def broken(self, reason: str) -> None:
        self.cut(reason, answer="bad_stream")

    def _answer(self, result: CallerStream | Reply | str) -> bool:
        answer = self.answer
        if answer is None or answer.done():
            return False
        answer.set_result(result)
        return True

    def _on_credit(self, hdrs: dict[str, str]) -> None:
        upload = self.upload
        if upload is None:
            raise protocol.StreamError("credit for a body that does not stream")
        credit = protocol.credit_of(hdrs)
        if upload.publish is None:
            if hdrs.get(protocol.H_STREAM) != self.call:
                raise protocol.StreamError("the callee took another call")
            fast, subject = self.fast, self.call_subject
            assert fast is not None

            def publish(block: bytes, payload: bytes) -> bool:
                return fast.publish_block(subject, b"", block, payload)

            if self.crossing:
                # Before the first chunk: the credit that opens where the
                # callee answers from now on (its head's reply took one answer).
                opening = protocol.block((protocol.H_STREAM, self.call), (protocol.H_CREDIT, 0))
                self._publish(opening, credit=True)
            upload.bind(publish, credit)
        else:
            upload.on_credit(credit)
        self._upload_progress()

    def _upload_progress(self) -> None:
        upload = self.upload
        if upload is not None and upload.eof_sent and not self.upload_sent_at:
            self.upload_sent_at = time.monotonic()

    def _on_head(self, head: Reply) -> None:
        if self.receiver is not None:
            raise protocol.StreamError("a second response head")
        hdrs = head.headers
        status = codec.final_status(hdrs.get(protocol.H_STREAM_STATUS))
        if status is None:
            raise protocol.StreamError("a response head without a valid status")
        call = hdrs.get(protocol.H_STREAM, "")
        if self.call and call != self.call:
            raise protocol.StreamError("a response head of another call")
        subject = protocol.call_subject(self.request_subject, call)
        if subject is None:
            raise protocol.StreamError("a response head with an invalid call id")
        self.call = call
        self.call_subject = subject.encode()
        self.status = status
        self.response_headers = hdrs
        length = protocol.length_of(hdrs)
        self.length = length
        rest = None if length is None else length - len(head.data)
        if rest is not None and rest < 0:
            raise protocol.StreamError("a response head longer than its announced length")
        self.receiver = Receiver(
            self.limits.window,
            deliver=self._write,
            finish=self._finished,
            send_credit=self._send_credit,
            length=rest,
        )
        if head.data:
            self._write(head.data)
        if protocol.H_EOF in hdrs:
            if rest:
                raise protocol.StreamError("a response head ending short of its length")
            self.receiver.done = True
            self._finished()
        else:
            self._send_credit(self.receiver.open())

    # -- to the callee -------------------------------------------------------------------

    def _publish(self, block: bytes, *, credit: bool = False) -> None:
        fast = self.fast
        if fast is not None and self.call_subject:
            reply = self.reply_to_callee(self.inbox, credit=credit)
            fast.publish_block(self.call_subject, reply, block, b"")

    def _send_credit(self, credit: int) -> None:
        # Its reply subject is where the callee sends the response's chunks.
        self._publish(protocol.credit_block(credit), credit=True)

    def silent(self) -> None:
        self.cut("the callee went silent past the stream idle timeout", answer=TIMEOUT)

    def beat(self) -> None:
        self._publish(protocol.BEAT_BLOCK)

    # -- to the client -------------------------------------------------------------------

    def attach(self, conn: Client, req: Any, done: Callable[[Any, Any], None]) -> None:
        """Become the answer of ``req`` on ``conn``: the response head now, the body as it comes."""
        if self.finished or conn.closed or conn.transport is None:
            self.client_lost()
            if conn.transport is not None:
                conn.transport.abort()  # cut before its head: nothing to answer with
            return
        self.conn, self.req, self.done = conn, req, done
        conn.stream = self
        if not self.body_complete:
            # The client is still sending a body nobody will read to its end.
            self.keep_alive = False
        block, _ = codec.http_block(self.response_headers)
        framing = (
            b"transfer-encoding: chunked\r\n"
            if self.length is None
            else b"content-length: %d\r\n" % self.length
        )
        conn.transport.write(
            b"HTTP/1.1 %d %s\r\n%s%s%s\r\n"
            % (
                self.status,
                codec.reason(self.status),
                block,
                framing,
                b"" if self.keep_alive else b"connection: close\r\n",
            )
        )
        pending, self.pending = self.pending, []
        for data in pending:
            self._write(data)
        if self.complete:
            self._finished()

    def _write(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or conn.transport is None:
            self.pending.append(data)
            return
        self.bytes_out += len(data)
        conn.transport.write(protocol.http_chunk(data) if self.length is None else data)

    def writable(self, ok: bool) -> None:
        """The client's socket drained (True) or filled up (False)."""
        if self.receiver is not None:
            self.receiver.set_blocked(not ok)

    def _finished(self) -> None:
        self.complete = True
        conn, done = self.conn, self.done
        if conn is None or done is None or self.finished:
            return
        self._abort_upload("the response ended before the body was sent")
        self.finished = True
        self._stop()
        if conn.transport is not None and self.length is None:
            conn.transport.write(protocol.HTTP_LAST_CHUNK)
        conn.stream = None
        if not self.body_complete or not self.keep_alive:
            self.req.keep_alive = False
        done(self.req, b"")

    def _abort_upload(self, reason: str) -> None:
        """Tell the callee a body it is still waiting for will not come."""
        upload = self.upload
        if upload is not None and upload.publish is not None and not upload.eof_sent:
            self._publish(protocol.abort_block(reason))

    def client_lost(self) -> None:
        """The client went away: stop, and tell the callee (its app's call is closed)."""
        if self.finished:
            return
        self._publish(protocol.abort_block("the caller went away"))
        self.finished = True
        self._stop()

    def cut(self, reason: str, *, answer: str = "cut") -> None:
        """Break the stream: the callee is told, the client's connection reset."""
        if self.finished:
            return
        logger.warning("stream %s cut: %s", self.call or "-", reason)
        self._publish(protocol.abort_block(reason))
        self.finished = True
        self._stop()
        self._answer(answer)
        conn = self.conn
        if conn is not None:
            conn.stream = None
            if conn.transport is not None:
                # A reset, not a close: the client must not take what it got as the whole body.
                conn.transport.abort()

    def _stop(self) -> None:
        self._stop_clock()
        self._close_inbox()
        if self.upload is not None and self.upload.paused:
            self.upload.paused = False
            self.upload.resume()

    def _close_inbox(self) -> None:
        if self.fast is not None and self.inbox:
            self.fast.close_inbox(self.inbox)
