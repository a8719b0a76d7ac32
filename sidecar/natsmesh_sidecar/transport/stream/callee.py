"""The callee's sidecar end of a streamed call.

One :class:`CalleeStream` per call, made

* for a request head that says its body streams (:func:`serve_upload`): the
  sidecar subscribes to the call's subject, opens a connection of its own to
  the app, writes the request head (the caller's Content-Length, else
  chunked), tells the caller it may send (a window of credit), and writes
  each chunk into the app as it arrives, granting more only while the app
  reads; the app's response then streams back (below);
* for an app response that does not fit one message or comes chunked
  (inbound's app connection hands it over, :func:`for_response`).

The response goes back as a head on the request's reply subject, then as
chunks sent within the caller's credit to the inbox the caller named with
it (across namespaces: see :class:`Answers`); the app's socket is paused
while the caller's client is slower than the app. The app's connection
dropping mid-body, or the caller going silent past the idle timeout, aborts
the stream (the caller resets its client); the caller's abort closes the
app's connection (the app sees its client go away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import httptools

from natsmesh_sidecar import codec, subjects
from natsmesh_sidecar.transport.natsfast import FastPath, Reply, encode_headers
from natsmesh_sidecar.transport.stream import protocol
from natsmesh_sidecar.transport.stream.peer import Peer
from natsmesh_sidecar.transport.stream.receiver import Receiver
from natsmesh_sidecar.transport.stream.sender import Sender
from natsmesh_sidecar.wire import StreamLimits

if TYPE_CHECKING:
    from natsmesh_sidecar.transport.budget import Hold

logger = logging.getLogger(__name__)

MAX_RESPONSE_HEADER_BYTES = 256 * 1024


class Answers:
    """Where a callee's messages to its caller go.

    Within a namespace: the head's reply subject (the caller's inbox) until
    the caller's first credit names one, then that one.

    Across namespaces the head's reply is a service import's ``_R_`` subject,
    which takes one answer (the unary export is ``Singleton``): it carries
    the first (a response head, an upload's first credit, a 101), and what
    follows waits for the caller's first credit. That comes over the call
    subjects' own import, a ``Stream`` export, so its ``_R_`` reply takes
    many: from then on everything goes there, without a reply subject of
    ours (each would open a reply mapping in the caller's account), and an
    empty message at the end closes it (nats-server keeps a ``Stream``
    mapping until an empty message, a failed delivery or its response
    threshold, refreshed by each answer: hence the beats, see
    :func:`.protocol.beat_period`).
    """

    __slots__ = ("fast", "held", "inbox", "once", "reply", "target", "used")

    def __init__(self, fast: FastPath, reply: str, caller: str) -> None:
        self.fast = fast
        self.reply = reply.encode()
        self.once = protocol.answers_once(reply)
        self.inbox = f"{subjects.inbox_prefix(caller)}."
        self.target = b""
        self.used = False
        self.held: list[tuple[bytes, bytes, bytes]] = []

    def send(self, block: bytes, payload: bytes = b"", reply: bytes = b"") -> bool:
        """Publish to the caller (``reply``: ours, dropped across namespaces)."""
        target = self.target
        if not target:
            if self.once and self.used:
                self.held.append((block, payload, reply))
                return True
            self.used = True
            target = self.reply
        return self.fast.publish_block(target, b"" if self.once else reply, block, payload)

    def bind(self, reply: str) -> None:
        """The caller's first credit came with ``reply``: everything goes there now.

        Only the caller can publish on its call subject (its identity is the
        last token), and an ``_R_`` subject there is the server's own.
        """
        prefix = subjects.SERVICE_REPLY_PREFIX if self.once else self.inbox
        if not reply.startswith(prefix):
            raise protocol.StreamError("credit naming a reply subject not the caller's")
        self.target = reply.encode()
        held, self.held = self.held, []
        for block, payload, ours in held:
            self.send(block, payload, ours)

    def close(self) -> None:
        """The call is over: release the reply mapping across namespaces."""
        if self.once and self.target:
            self.fast.publish_empty(self.target)
            self.target = b""


class CalleeStream(Peer):
    def __init__(
        self,
        limits: StreamLimits,
        *,
        pause: Callable[[], None],
        resume: Callable[[], None],
        close_app: Callable[[], None],
    ) -> None:
        super().__init__(limits)
        self.close_app = close_app
        self.fast: FastPath | None = None
        self.answers: Answers | None = None
        self.call = ""
        self.call_subject = ""
        self.sub: Any = None
        # The response.
        self.sender = Sender(
            limits.chunk_bytes,
            pause=pause,
            resume=resume,
            high=limits.chunk_bytes * max(2, limits.window // 2),
        )
        self.status = 0
        self.lines = ""
        self.length: int | None = None
        self.head_sent = False
        self.head_ready = False
        #: Resolved with the status once the response head is sent (or the stream cut).
        self.headed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        #: Woken by every change of the response body (:func:`_whole` waits on it).
        self.changed: asyncio.Event | None = None

    # -- setting up ------------------------------------------------------------------

    def bind(self, fast: FastPath, msg: Reply, call: str) -> bool:
        """The call this stream serves; False if it cannot stream (see :func:`streamable`)."""
        subject = protocol.call_subject(msg.subject, call)
        if subject is None:
            return False
        self.fast = fast
        self.answers = Answers(fast, msg.reply, msg.subject.rsplit(".", 1)[-1])
        self.crossing = self.answers.once
        self.call = call
        self.call_subject = subject
        return True

    async def open(self) -> None:
        """Subscribe to the call's subject (before anything tells the caller of it)."""
        assert self.fast is not None
        self.sub = await self.fast.subscribe(self.call_subject, "", self.on_message)
        self._arm()

    # -- messages from the caller ----------------------------------------------------

    def handle(self, what: str, msg: Reply) -> None:
        if what != protocol.CREDIT:
            raise protocol.StreamError(f"unexpected {what} message from the caller")
        credit = protocol.credit_of(msg.headers)
        if self.sender.publish is None:
            assert self.answers is not None
            self.answers.bind(msg.reply)
            self.sender.bind(self._publish_chunk, credit)
        else:
            self.sender.on_credit(credit)
        self._maybe_done()

    def aborted(self, reason: str) -> None:
        self.cut(f"caller aborted: {reason}", tell=False)

    def broken(self, reason: str) -> None:
        self.cut(reason)

    def _publish_chunk(self, block: bytes, payload: bytes) -> bool:
        answers = self.answers
        return answers is not None and answers.send(block, payload)

    def _to_caller(self, block: bytes, payload: bytes = b"") -> None:
        if self.answers is not None:
            self.answers.send(block, payload)

    def final(self, status: int, code: str, message: str) -> None:
        """A unary reply (an error) where the caller waits for the response head."""
        self._to_caller(*unary_block(status, code, message))

    def send_credit(self, credit: int) -> None:
        self._to_caller(protocol.credit_block(credit))

    def send_ready(self, credit: int) -> None:
        """Tell the caller the app is reached and how many request chunks it may send."""
        self._to_caller(protocol.block((protocol.H_STREAM, self.call), (protocol.H_CREDIT, credit)))

    # -- the app's response ----------------------------------------------------------

    def set_head(self, status: int, lines: str, length: int | None) -> None:
        self.status, self.lines, self.length = status, lines, length
        self.head_ready = True

    def feed(self, data: bytes) -> None:
        if not self.finished:
            self.sender.feed(data)
        if self.changed is not None:
            self.changed.set()

    append = feed

    def end(self) -> None:
        if self.changed is not None:
            self.changed.set()
        if self.finished:
            return
        self.sender.end()
        self.flush_head()
        self._maybe_done()

    def flush_head(self) -> None:
        """Send the response head once it is known and we are bound; a body
        complete by then and within one chunk goes with it."""
        if self.head_sent or not self.head_ready or self.answers is None or self.finished:
            return
        sender = self.sender
        whole = sender.ended and sender.buffered <= self.limits.chunk_bytes
        payload = b"".join(sender.buf) if whole else b""
        extra = f"{protocol.H_STREAM}: {self.call}\r\n{protocol.H_STREAM_STATUS}: {self.status}\r\n"
        if self.length is not None:
            extra += f"{protocol.H_LENGTH}: {self.length}\r\n"
        if whole:
            extra += f"{protocol.H_EOF}: 1\r\n"
            sender.buf.clear()
            sender.buffered = 0
            sender.eof_sent = True
        block = f"NATS/1.0\r\n{self.lines}{extra}\r\n".encode("utf-8", "replace")
        self.head_sent = True
        self._to_caller(block, payload)
        if not self.headed.done():
            self.headed.set_result(self.status)
        self._maybe_done()

    def app_lost(self) -> None:
        """The app's connection closed: a body not yet complete is cut."""
        if not self.finished and not self.sender.ended:
            self.cut("the app closed its connection mid-body")

    def _maybe_done(self) -> None:
        if self.finished or not self.sender.eof_sent:
            return
        if self.receiver is not None and not self.receiver.done:
            return
        self.finished = True
        self._stop()

    # -- failure -----------------------------------------------------------------------

    def cut(self, reason: str, *, tell: bool = True) -> None:
        if self.finished:
            return
        logger.warning("stream %s cut: %s", self.call or "-", reason)
        if tell:
            self._to_caller(protocol.abort_block(reason))
        self.finished = True
        self._stop()
        self.close_app()
        if self.changed is not None:
            self.changed.set()
        if not self.headed.done():
            self.headed.set_result(0)

    def stalled(self, now: float) -> str | None:
        # Beats keep a quiet stream alive, but a request body that stopped
        # half-way (a client that stalls its upload) must not hold the app's
        # connection for ever. A response may be quiet for hours (SSE).
        receiver = self.receiver
        if (
            receiver is not None
            and not receiver.done
            and not receiver.blocked
            and now - receiver.last_chunk > self.limits.idle_timeout_s
        ):
            return "no chunk of the request body for the stream idle timeout"
        return None

    def silent(self) -> None:
        self.cut("the caller went silent past the stream idle timeout")

    def beat(self) -> None:
        self._to_caller(protocol.BEAT_BLOCK)

    def _stop(self) -> None:
        self._stop_clock()
        if self.receiver is not None:
            self.receiver.close()  # its hold of the byte budget goes back
        sub, self.sub = self.sub, None
        drop_subscription(self.fast, sub)
        if self.answers is not None:
            self.answers.close()


def drop_subscription(fast: FastPath | None, sub: Any) -> None:
    """Forget a call subject's subscription now; its UNSUB goes out in the background."""
    if sub is None:
        return
    if fast is not None:
        fast.handlers.pop(sub._id, None)
    task = asyncio.get_running_loop().create_task(sub.unsubscribe())
    task.add_done_callback(_quiet)


def _quiet(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("unsubscribing a stream failed: %s", task.exception())


def streamable(msg: Reply, may_subscribe: Callable[[str], bool]) -> bool:
    """Whether a call's answers can stream: the reply an inbox or a service
    import's, and this sidecar's user allowed to subscribe to the caller's call
    subjects (across namespaces the grant that comes with the call subjects'
    import: a JWT from an older operator lacks it)."""
    reply = msg.reply
    if not reply.startswith(subjects.INBOX_ROOT + ".") and not protocol.answers_once(reply):
        return False
    probe = protocol.call_subject(msg.subject, "0" * (2 * protocol.CALL_ID_BYTES))
    return probe is not None and may_subscribe(probe)


# -- a streamed response of a unary request (inbound's pooled connection) ---------------


def for_response(
    limits: StreamLimits, transport: asyncio.Transport, close_app: Callable[[], None]
) -> CalleeStream:
    """A response the app is still sending, found on a pooled connection."""
    return CalleeStream(
        limits,
        pause=transport.pause_reading,
        resume=transport.resume_reading,
        close_app=close_app,
    )


async def begin_response(
    stream: CalleeStream,
    fast: FastPath,
    msg: Reply,
    status: int,
    lines: str,
    length: int | None,
    may_subscribe: Callable[[str], bool],
    max_inline: int,
) -> None:
    """Send a response found streaming back to the caller of ``msg``.

    A caller it cannot stream to (another namespace, a user without the
    grant) gets the body whole if it fits one message, else a 502.
    """
    stream.set_head(status, lines, length)
    # The caller's route may ask for its own idle timeout: both ends keep one clock.
    stream.limits = protocol.limits_of(msg.headers, stream.limits)
    if not streamable(msg, may_subscribe) or not stream.bind(fast, msg, protocol.new_call_id()):
        await _whole(stream, fast, msg, status, lines, max_inline)
        return
    try:
        await stream.open()
    except Exception as exc:
        stream.cut(f"cannot subscribe to the call: {exc}", tell=False)
        unary_reply(fast, msg.reply, 502, "stream_failed", "the callee could not stream its answer")
        return
    stream.flush_head()


async def _whole(
    stream: CalleeStream, fast: FastPath, msg: Reply, status: int, lines: str, max_inline: int
) -> None:
    """Collect the body for a one-message reply, refusing it past ``max_inline``."""
    sender = stream.sender
    sender.high = max_inline + 1  # never pause: read it all, up to the limit
    if sender.paused:
        # Paused at the stream's own mark before it was found unstreamable:
        # else nothing more comes and the caller waits out the idle timeout.
        sender.paused = False
        sender.resume()
    changed = stream.changed = asyncio.Event()
    deadline = time.monotonic() + stream.limits.idle_timeout_s
    while not sender.ended and sender.buffered <= max_inline and not stream.finished:
        changed.clear()
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), left)
    if sender.ended and sender.buffered <= max_inline:
        body = b"".join(sender.buf)
        stream.finished = True
        if msg.reply:
            head = f"NATS/1.0\r\n{lines}Nm-Status: {status}\r\n\r\n".encode("utf-8", "replace")
            fast.publish_block(msg.reply.encode(), b"", head, body)
        return
    stream.finished = True
    stream.close_app()
    unary_reply(fast, msg.reply, 502, "response_too_large", "the response does not fit one message")


def unary_block(
    status: int, code: str, message: str, *, undelivered: bool = False
) -> tuple[bytes, bytes]:
    """A refusal or an error as one reply: (``Nm-Status`` header block, JSON error body);
    ``undelivered``: nothing reached the app (``Nm-Undelivered``, safe to try elsewhere)."""
    headers = {
        "content-type": "application/json",
        codec.H_STATUS: str(status),
        codec.H_ERROR: code,
    }
    if undelivered:
        headers[codec.H_UNDELIVERED] = "1"
    return encode_headers(headers), codec.error_body(code, message, "")


def unary_reply(
    fast: FastPath, reply: str, status: int, code: str, message: str, *, undelivered: bool = False
) -> None:
    """:func:`unary_block` to ``reply``, before anything else went there."""
    if reply:
        block = unary_block(status, code, message, undelivered=undelivered)
        fast.publish_block(reply.encode(), b"", *block)


# -- an upload: a request whose body streams ---------------------------------------------


class _AppCall(asyncio.Protocol):
    """A connection of its own to the app for one streamed request."""

    def __init__(self, stream: CalleeStream, chunked: bool, head: bool) -> None:
        self.stream = stream
        self.chunked = chunked
        self.head = head
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[str, str]] = []
        self.header_bytes = 0
        self.length: int | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.stream.head_ready:
            self.stream.cut("the app closed its connection before answering")
        else:
            self.stream.app_lost()

    def pause_writing(self) -> None:
        if self.stream.receiver is not None:
            self.stream.receiver.set_blocked(True)

    def resume_writing(self) -> None:
        if self.stream.receiver is not None:
            self.stream.receiver.set_blocked(False)

    def write_body(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(protocol.http_chunk(data) if self.chunked else data)

    def end_body(self) -> None:
        if self.chunked and self.transport is not None and not self.closed:
            self.transport.write(protocol.HTTP_LAST_CHUNK)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.stream.cut(f"malformed response from the app: {exc}")
            self.close()
            return
        self.stream.flush_head()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_RESPONSE_HEADER_BYTES:
            raise ValueError("response headers too large")
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.headers = []  # interim (100 Continue): the real one follows
            return
        self.stream.set_head(status, codec.nats_lines(self.headers), _length(self.headers))
        if self.head or status in (204, 304):
            self.stream.end()

    def on_body(self, body: bytes) -> None:
        self.stream.feed(body)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() >= 200:
            self.stream.end()
            self.close()


def _length(headers: list[tuple[str, str]]) -> int | None:
    """The response's Content-Length, unless it is chunked (or has none)."""
    length = None
    for name, value in headers:
        low = name.lower()
        if low == "transfer-encoding":
            return None
        if low == "content-length" and value.strip().isdigit():
            length = int(value.strip())
    return length


async def serve_upload(
    msg: Reply,
    request: Callable[[int | None], bytes | None],
    *,
    fast: FastPath,
    limits: StreamLimits,
    app_host: str,
    app_port: int,
    may_subscribe: Callable[[str], bool],
    timeout_s: float,
    hold: Hold | None = None,
) -> tuple[int, str]:
    """Serve one streamed request; (status, error code) once the response head is out.

    ``request(length)`` renders the request head for the app; ``hold``: the
    call's share of the byte budget, which the body's receiver takes over.
    """
    hdrs = msg.headers
    call = hdrs.get(protocol.H_STREAM, "")
    try:
        length = protocol.length_of(hdrs)
    except protocol.StreamError:
        length = -1
    loop = asyncio.get_running_loop()
    holder: list[_AppCall] = []

    def close_app() -> None:
        if holder:
            holder[0].close()

    stream = CalleeStream(
        limits,
        pause=lambda: (
            holder[0].transport.pause_reading() if holder and holder[0].transport else None
        ),
        resume=lambda: (
            holder[0].transport.resume_reading() if holder and holder[0].transport else None
        ),
        close_app=close_app,
    )
    if length == -1 or not streamable(msg, may_subscribe) or not stream.bind(fast, msg, call):
        unary_reply(
            fast, msg.reply, 413, "payload_too_large", "this callee cannot take a streamed body"
        )
        return 413, "payload_too_large"
    head = request(length)
    if head is None:
        unary_reply(fast, msg.reply, 400, "bad_request", "invalid method or target")
        return 400, "bad_request"
    await stream.open()
    try:
        _, app = await loop.create_connection(
            lambda: _AppCall(stream, length is None, hdrs.get(codec.H_STREAM_METHOD) == "HEAD"),
            app_host,
            app_port,
        )
    except OSError as exc:
        stream.cut(f"app unreachable: {exc}", tell=False)
        unary_reply(
            fast, msg.reply, 502, "app_unreachable", f"app unreachable: {exc.strerror or exc}"
        )
        return 502, "app_unreachable"
    holder.append(app)
    assert app.transport is not None
    app.transport.write(head)
    stream.receiver = Receiver(
        limits.window,
        deliver=app.write_body,
        finish=app.end_body,
        send_credit=stream.send_credit,
        length=length,
        hold=hold,
    )
    stream.send_ready(stream.receiver.open())
    return await headed(stream, timeout_s), ""


async def headed(stream: CalleeStream, timeout_s: float) -> int:
    """Wait for the response head; the app gets ``timeout_s`` once it has the whole body."""
    done_at = 0.0
    while not stream.headed.done():
        receiver = stream.receiver
        if receiver is not None and receiver.done and not done_at:
            done_at = time.monotonic()
        if done_at and time.monotonic() - done_at > timeout_s:
            stream.final(504, "app_timeout", "the app did not answer in time")
            stream.cut("the app did not answer in time", tell=False)
            return 504
        try:
            await asyncio.wait_for(asyncio.shield(stream.headed), 0.25)
        except TimeoutError:
            continue
    status = stream.headed.result()
    return status or 502
