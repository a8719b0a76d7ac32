"""The sidecar's hot NATS path, on top of a connected nats-py client.

Profiling the two-sidecar path (bench/sidecar.py --profile) showed nats-py's
per-message machinery as the largest share of a sidecar's CPU: ``request()``
builds a Future, a NUID token, ``asyncio.wait_for`` and a done callback per
call; every publish validates each header with a regex; and every received
message is turned into a ``Msg``, queued on its subscription and handed over
by that subscription's task, i.e. one more event-loop hop per message on
each side. Here, for the two subscriptions that carry traffic:

* replies: one wildcard inbox subscription (``<inbox_prefix>.<nuid>.*``);
  a reply resolves its waiter straight from the protocol parser, keyed by
  the last token; timeouts are ``loop.call_later`` handles, no ``wait_for``;
* requests to this service: the queue subscription's messages go straight
  from the parser to the inbound handler, no per-subscription task;
* publishes: the HPUB command is built here from the (already validated)
  header dict and appended to nats-py's own pending buffer, so ordering with
  everything else nats-py sends is kept and its flusher writes it.

Everything else (connect, reconnect and resubscribe, PING, JetStream, micro
discovery) stays nats-py's. Complete MSG/HMSG frames are split by hand
before nats-py's regex parser sees them (:meth:`FastPath._parse`). This relies
on a few private attributes of nats-py's ``Client`` (``_process_msg``,
``_ps`` and its ``buf``/``state``/``parse``, ``_pending``,
``_pending_data_size``, ``_flush_queue``, ``_max_pending_size``); nats-py is
pinned, and
tests/unit/sidecar/test_sidecar_natsfast.py checks they are still there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_CRLF = b"\r\n"
#: nats-py's parser state between frames (nats.protocol.parser.AWAITING_CONTROL_LINE).
_AWAITING_CONTROL_LINE = 1
_HDR_LINE = b"NATS/1.0\r\n"
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
#: Bound of :attr:`FastPath._subjects`.
_SUBJECTS_MAX = 4096

#: Outcomes a waiter can end with besides a reply.
TIMEOUT = "timeout"
NO_RESPONDERS = "noResponders"
UNAVAILABLE = "unavailable"
VIOLATION = "permission_violation"


class Reply:
    """A received message: what the handlers need and nothing else."""

    __slots__ = ("data", "headers", "reply", "subject")

    def __init__(self, subject: str, reply: str, data: bytes, headers: dict[str, str]) -> None:
        self.subject = subject
        self.reply = reply
        self.data = data
        self.headers = headers


def encode_headers(headers: dict[str, str]) -> bytes:
    """A NATS header block; CR/LF in values are blanked as nats-py does."""
    parts = ["NATS/1.0\r\n"]
    for k, v in headers.items():
        if "\r" in v or "\n" in v:
            v = v.translate(_NEWLINES)
        parts.append(f"{k}: {v}\r\n")
    parts.append("\r\n")
    # One encode of the block, not one per header.
    return "".join(parts).encode()


#: What ``bytes.strip()`` strips: the header parser strips text exactly as the bytes.
_WS = " \t\n\r\x0b\x0c"
_SPACE = re.compile(r"\s")
#: Header name as received -> the key to store, or "" for a name that is
#: skipped. The same few names arrive on every message: one dict lookup
#: instead of strip, ASCII and whitespace checks per header.
_KEYS: dict[str, str] = {}
_KEYS_MAX = 4096


def _key(name: str) -> str:
    key = _KEYS.get(name)
    if key is None:
        key = name.strip(_WS)
        # Like nats-py: names must be ASCII without whitespace (str.isspace).
        if not key.isascii() or _SPACE.search(key) is not None:
            key = ""
        if len(_KEYS) >= _KEYS_MAX:
            _KEYS.clear()  # a peer sending endless new names cannot grow this
        _KEYS[name] = key
    return key


def parse_headers(raw: bytes) -> dict[str, str]:
    """Like nats-py: inline status -> ``Status``/``Description``; bad lines skipped."""
    out: dict[str, str] = {}
    if not raw:
        return out
    first, _, rest = raw.partition(_CRLF)
    if len(first) > 9 and first[8:9] == b" ":
        status, _, desc = first[9:].strip().partition(b" ")
        if status.isdigit():
            out["Status"] = status.decode()
            if desc:
                out["Description"] = desc.decode("utf-8", "replace")
    # One decode for the whole block: CR, LF and ":" are ASCII, so they split
    # the text where they split the bytes, and an invalid byte decodes to
    # U+FFFD whether its line is decoded alone or with the others.
    keys = _KEYS
    for line in rest.decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = keys.get(name)
        if key is None:
            key = _key(name)
        if key:
            out[key] = value.strip(_WS)
    return out


def _split(data: bytes, pos: int) -> tuple[int, int, bytes, bytes, bytes, bytes | None] | None:
    """The complete MSG/HMSG frame at ``pos``: (end, sid, subject, reply, payload, headers).

    None for anything else: another operation, a frame cut by the read, a
    malformed control line.
    """
    if data.startswith(b"HMSG ", pos):
        has_headers = True
    elif data.startswith(b"MSG ", pos):
        has_headers = False
    else:
        return None
    eol = data.find(_CRLF, pos)
    if eol < 0:
        return None
    args = data[pos:eol].split()
    try:
        if has_headers:
            # HMSG <subject> <sid> [reply] <header bytes> <total bytes>
            if len(args) == 5:
                _, subject, sid_b, hdr_b, total_b = args
                reply = b""
            elif len(args) == 6:
                _, subject, sid_b, reply, hdr_b, total_b = args
            else:
                return None
            hdr_len = int(hdr_b)
        else:
            # MSG <subject> <sid> [reply] <bytes>
            if len(args) == 4:
                _, subject, sid_b, total_b = args
                reply = b""
            elif len(args) == 5:
                _, subject, sid_b, reply, total_b = args
            else:
                return None
            hdr_len = 0
        sid = int(sid_b)
        total = int(total_b)
    except ValueError:
        return None
    start = eol + 2
    end = start + total
    if end + 2 > len(data) or hdr_len > total or hdr_len < 0:
        return None
    headers = data[start : start + hdr_len] if has_headers else None
    return end + 2, sid, subject, reply, data[start + hdr_len : end], headers


class FastPath:
    """Request-reply and publish for one nats-py connection; see the module docstring."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.loop = asyncio.get_running_loop()
        #: Requests waiting for their reply, by the reply subject's last token.
        self.waiters: dict[bytes, Waiter] = {}
        #: Streamed calls' inboxes (natsmesh_sidecar.transport.stream), by the same
        #: last token: every message, until closed. Looked up only when no
        #: waiter matched.
        self.streams: dict[bytes, Callable[[Reply | str], None]] = {}
        #: Encoded request subjects (from the route table, so few).
        self._subjects: dict[str, bytes] = {}
        self.handlers: dict[int, Callable[[Reply], None]] = {}
        self._prefix = ""
        self._prefix_b = b""
        self._prefix_len = 0
        self._reply_sid = -1
        self._seq = 0
        self._orig_process_msg = nc._process_msg
        self._done = self.loop.create_future()
        self._done.set_result(None)
        self._reader: asyncio.StreamReader | None = None
        self._flush_soon = False
        nc._process_msg = self._process_msg
        # The parser object lives as long as the client (reconnects reset it):
        # its ``parse`` is replaced once.
        self._ps = nc._ps
        self._orig_parse = nc._ps.parse
        nc._ps.parse = self._parse

    async def start(self, inbox_prefix: str) -> None:
        self._prefix = f"{inbox_prefix}.{os.urandom(8).hex()}."
        self._prefix_b = self._prefix.encode()
        self._prefix_len = len(self._prefix_b)
        sub = await self.nc.subscribe(self._prefix + "*")
        self._reply_sid = sub._id

    async def subscribe(self, subject: str, queue: str, handler: Callable[[Reply], None]) -> Any:
        """A subscription whose messages go straight to ``handler`` (no task hop)."""
        sub = await self.nc.subscribe(subject, queue=queue)
        self.handlers[sub._id] = handler
        return sub

    # -- receive ---------------------------------------------------------------

    async def _parse(self, data: bytes = b"") -> None:
        """nats-py's ``Parser.parse`` for whole MSG/HMSG frames, without regexes.

        nats-py matches every frame against a list of regexes, copies it out
        of a bytearray and awaits ``_process_msg`` (a coroutine per message).
        Here the complete MSG and HMSG frames at the front of ``data`` are
        split by hand and dispatched synchronously when they are ours. The
        first thing that is anything else (PING, +OK, INFO, -ERR, a frame cut
        by the read, a malformed line), and everything after it, goes to
        nats-py's own parser, which then holds the rest of the stream until
        its buffer is empty again: the bytes are parsed exactly once, in order.
        """
        self._hook_reader()
        ps = self._ps
        if ps.buf or ps.state != _AWAITING_CONTROL_LINE:
            await self._orig_parse(data)
            return
        size = len(data)
        pos = self._take(data, 0)
        while pos < size:
            frame = _split(data, pos)
            if frame is None:
                break
            # A whole frame of a subscription nats-py delivers itself.
            pos, sid, subject, reply, payload, headers = frame
            await self._orig_process_msg(sid, subject, reply, payload, headers)
            pos = self._take(data, pos)
        if pos < size:
            await self._orig_parse(data[pos:] if pos else data)

    def _take(self, data: bytes, pos: int) -> int:
        """Dispatch the whole frames of ours from ``pos``; where the first other thing starts."""
        size = len(data)
        while pos < size:
            frame = _split(data, pos)
            if frame is None:
                break
            end, sid, subject, reply, payload, headers = frame
            if not self._dispatch(sid, subject, reply, payload, headers):
                break
            pos = end
        return pos

    def _hook_reader(self) -> None:
        """Take reads from the connection's StreamReader as they arrive.

        nats-py's read loop is a task: every read woke it (a future, a task
        step, a copy out of the reader's buffer) before the parser saw a
        byte. Each new reader (connect, TLS upgrade, reconnect) first
        delivers through that loop, which calls :meth:`_parse`, which hooks
        the reader; from then on its ``feed_data`` hands our frames over at once.
        """
        reader = getattr(getattr(self.nc, "_transport", None), "_io_reader", None)
        if reader is None or reader is self._reader or not isinstance(reader, asyncio.StreamReader):
            return
        self._reader = reader
        orig = reader.feed_data
        ps = self._ps
        take = self._take

        def feed(data: Any) -> None:
            # Only while the read loop is parked on an empty reader with the
            # parser between frames: nothing earlier is still unparsed, so
            # handling these frames now keeps the stream's order.
            if (
                reader._waiter is not None  # type: ignore[attr-defined]
                and not reader._buffer  # type: ignore[attr-defined]
                and not ps.buf
                and ps.state == _AWAITING_CONTROL_LINE
            ):
                # A frame that is not ours goes to nats-py, with the rest.
                pos = take(data, 0)
                size = len(data)
                if pos == size:
                    return
                if pos:
                    data = data[pos:]
            orig(data)

        reader.feed_data = feed  # type: ignore[method-assign]

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        """What nats-py's own parser calls (for frames :meth:`_parse` passed on)."""
        if not self._dispatch(sid, subject, reply, data, headers):
            await self._orig_process_msg(sid, subject, reply, data, headers)

    def _dispatch(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> bool:
        """Handle a message of the reply or a fast subscription; False if not ours."""
        if sid == self._reply_sid:
            self._on_reply(subject, data, headers or b"")
            return True
        handler = self.handlers.get(sid)
        if handler is None:
            return False
        stats = self.nc.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        try:
            handler(Reply(subject.decode(), reply.decode(), data, parse_headers(headers or b"")))
        except Exception:
            logger.exception("message handler failed")
        return True

    def _on_reply(self, subject: bytes, data: bytes, headers: bytes) -> None:
        waiter = self.waiters.get(subject[self._prefix_len :])
        if waiter is None:
            if self.streams:
                self._on_stream(subject[self._prefix_len :], data, headers)
            return
        hdrs = parse_headers(headers)
        if not data and hdrs.get("Status") == "503":
            waiter.resolve(NO_RESPONDERS)
            return
        waiter.resolve(Reply("", "", data, hdrs))

    def _on_stream(self, token: bytes, data: bytes, headers: bytes) -> None:
        handler = self.streams.get(token)
        if handler is None:
            return
        try:
            handler(Reply("", "", data, parse_headers(headers)))
        except Exception:
            logger.exception("stream handler failed")

    def open_inbox(self, handler: Callable[[Reply | str], None]) -> bytes:
        """A reply subject of ours whose every message goes to ``handler``
        (until :meth:`close_inbox`); :meth:`fail_all` tells it ``UNAVAILABLE``."""
        self._seq += 1
        token = b"s%x" % self._seq
        self.streams[token] = handler
        return self._prefix_b + token

    def close_inbox(self, inbox: bytes) -> None:
        self.streams.pop(inbox[self._prefix_len :], None)

    # -- send --------------------------------------------------------------------

    def publish(self, subject: str, reply: str, headers: dict[str, str], payload: bytes) -> bool:
        """Queue an HPUB; False if the connection is closed (nothing sent)."""
        hdr = encode_headers(headers)
        return self.publish_block(subject.encode(), reply.encode(), hdr, payload)

    def publish_block(self, subject: bytes, reply: bytes, hdr: bytes, payload: bytes) -> bool:
        """:meth:`publish` with the header block already encoded (:func:`encode_headers`)."""
        nc = self.nc
        if nc.is_closed:
            return False
        total = len(hdr) + len(payload)
        cmd = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (subject, reply, len(hdr), total, hdr, payload)
        nc._pending.append(cmd)
        nc._pending_data_size += len(cmd)
        stats = nc.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += len(payload)
        if not self._flush_soon and nc.is_connected:
            # One write for everything published in this loop iteration.
            self._flush_soon = True
            self.loop.call_soon(self._flush)
        return True

    def publish_empty(self, subject: bytes) -> bool:
        """A PUB with neither headers nor payload: what ends a ``Stream`` reply
        mapping of a service import (natsmesh_sidecar.transport.stream.callee.Answers)."""
        nc = self.nc
        if nc.is_closed:
            return False
        cmd = b"PUB %s 0\r\n\r\n" % subject
        nc._pending.append(cmd)
        nc._pending_data_size += len(cmd)
        nc.stats["out_msgs"] += 1
        if not self._flush_soon and nc.is_connected:
            self._flush_soon = True
            self.loop.call_soon(self._flush)
        return True

    def _flush(self) -> None:
        """Write nats-py's pending commands, as its flusher task would.

        Waking that task cost a queue put, a task step and a ``drain()`` per
        flush; a callback is a fraction of that. The flusher still does the
        work when the socket is not keeping up (it awaits ``drain()``: the
        back-pressure) and whenever writing fails (its error handling). Both
        take the whole pending list at once, so the order is kept.
        """
        self._flush_soon = False
        nc = self.nc
        if not nc._pending_data_size or not nc.is_connected:
            return
        writer = getattr(nc._transport, "_io_writer", None)
        transport = getattr(writer, "transport", None)
        if (
            transport is not None
            and not transport.is_closing()
            and not transport.get_write_buffer_size()
        ):
            try:
                transport.writelines(nc._pending)
            except (OSError, RuntimeError):
                pass  # the flusher below meets the same error and handles it
            else:
                nc._pending = []
                nc._pending_data_size = 0
                return
        fq = nc._flush_queue
        if fq is not None and fq.empty():
            # Wake nats-py's flusher; it resolves a future nobody waits on.
            fq.put_nowait(self._done)

    def request(
        self, subject: str, headers: dict[str, str] | bytes, payload: bytes, timeout: float
    ) -> asyncio.Future[Reply | str]:
        """A future resolving to the :class:`Reply` or an outcome string.

        Never raises for NATS conditions: ``TIMEOUT``, ``NO_RESPONDERS``,
        ``UNAVAILABLE`` and ``VIOLATION`` come back as results.
        """
        fut: asyncio.Future[Reply | str] = self.loop.create_future()

        def resolve(result: Reply | str) -> None:
            if not fut.done():  # a cancelled caller
                fut.set_result(result)

        if not self.send_request(subject, headers, payload, timeout, resolve):
            fut.set_result(UNAVAILABLE)
        return fut

    def send_request(
        self,
        subject: str,
        headers: dict[str, str] | bytes,
        payload: bytes,
        timeout: float,
        callback: Callable[[Reply | str], None],
    ) -> bool:
        """:meth:`request` with a callback instead of a future (the hot path).

        ``headers`` is a header dict or a block :func:`encode_headers` made.
        ``callback`` gets the reply or the outcome exactly once, straight from
        the parser, the timer or :meth:`fail_all`: no future, no scheduled
        callbacks. False (and no callback ever) if nothing could be sent.
        """
        self._seq += 1
        token = b"%x" % self._seq
        waiter = Waiter(self.waiters, token, subject, callback)
        self.waiters[token] = waiter
        waiter.timer = self.loop.call_later(timeout, waiter.resolve, TIMEOUT)
        subject_b = self._subjects.get(subject)
        if subject_b is None:
            subject_b = subject.encode()
            if len(self._subjects) < _SUBJECTS_MAX:
                self._subjects[subject] = subject_b
        hdr = headers if isinstance(headers, bytes) else encode_headers(headers)
        if not self.publish_block(subject_b, self._prefix_b + token, hdr, payload):
            waiter.cancel()
            return False
        return True

    # -- failure fan-out -------------------------------------------------------------

    def fail_all(self, outcome: str = UNAVAILABLE) -> int:
        """Resolve every waiter (the connection dropped: their replies are lost)."""
        waiters = list(self.waiters.values())
        for waiter in waiters:
            waiter.resolve(outcome)
        streams = list(self.streams.values())
        self.streams.clear()
        for handler in streams:
            try:
                handler(outcome)
            except Exception:
                logger.exception("stream handler failed")
        return len(waiters)

    def fail_subject(self, subject: str, outcome: str = VIOLATION) -> int:
        """Resolve the waiters of requests the server refused to publish."""
        waiters = [w for w in self.waiters.values() if w.subject == subject]
        for waiter in waiters:
            waiter.resolve(outcome)
        return len(waiters)


class Waiter:
    """One request waiting for its reply; resolved once, then forgotten."""

    __slots__ = ("callback", "subject", "timer", "token", "waiters")

    def __init__(
        self,
        waiters: dict[bytes, Waiter],
        token: bytes,
        subject: str,
        callback: Callable[[Reply | str], None],
    ) -> None:
        self.waiters = waiters
        self.token = token
        self.subject = subject
        self.callback: Callable[[Reply | str], None] | None = callback
        self.timer: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        self.callback = None
        if self.timer is not None:
            self.timer.cancel()
        self.waiters.pop(self.token, None)

    def resolve(self, result: Reply | str) -> None:
        callback = self.callback
        if callback is None:
            return
        self.cancel()
        try:
            callback(result)
        except Exception:
            logger.exception("reply handler failed")


def violation_subject(text: str) -> tuple[str, str] | None:
    """``('publish', subject)`` from a server 'Permissions Violation for Publish to "x"'."""
    low = text.lower()
    i = low.find("permissions violation for ")
    if i < 0:
        return None
    rest = text[i + len("permissions violation for ") :]
    kind, _, rest = rest.partition(" to ")
    first = rest.find('"')
    last = rest.find('"', first + 1)
    if first < 0 or last < 0:
        return None
    return kind.strip().lower(), rest[first + 1 : last]
