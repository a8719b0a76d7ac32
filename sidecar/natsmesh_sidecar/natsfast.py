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
discovery) stays nats-py's. This relies on a few private attributes of
nats-py's ``Client`` (``_process_msg``, ``_pending``, ``_pending_data_size``,
``_flush_queue``, ``_max_pending_size``); nats-py is pinned, and
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
_HDR_LINE = b"NATS/1.0\r\n"
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})

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
    for line in rest.decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = _key(name)
        if key:
            out[key] = value.strip(_WS)
    return out


class FastPath:
    """Request-reply and publish for one nats-py connection; see the module docstring."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.loop = asyncio.get_running_loop()
        self.waiters: dict[str, tuple[asyncio.Future[Reply | str], str]] = {}
        self.handlers: dict[int, Callable[[Reply], None]] = {}
        self._prefix = ""
        self._prefix_len = 0
        self._reply_sid = -1
        self._seq = 0
        self._orig_process_msg = nc._process_msg
        self._done = self.loop.create_future()
        self._done.set_result(None)
        nc._process_msg = self._process_msg

    async def start(self, inbox_prefix: str) -> None:
        self._prefix = f"{inbox_prefix}.{os.urandom(8).hex()}."
        self._prefix_len = len(self._prefix)
        sub = await self.nc.subscribe(self._prefix + "*")
        self._reply_sid = sub._id

    async def subscribe(self, subject: str, queue: str, handler: Callable[[Reply], None]) -> Any:
        """A subscription whose messages go straight to ``handler`` (no task hop)."""
        sub = await self.nc.subscribe(subject, queue=queue)
        self.handlers[sub._id] = handler
        return sub

    # -- receive ---------------------------------------------------------------

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        if sid == self._reply_sid:
            self._on_reply(subject, data, headers)
            return
        handler = self.handlers.get(sid)
        if handler is None:
            await self._orig_process_msg(sid, subject, reply, data, headers)
            return
        stats = self.nc.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        try:
            handler(Reply(subject.decode(), reply.decode(), data, parse_headers(headers)))
        except Exception:
            logger.exception("message handler failed")

    def _on_reply(self, subject: bytes, data: bytes, headers: bytes) -> None:
        token = subject[self._prefix_len :].decode()
        entry = self.waiters.get(token)
        if entry is None or entry[0].done():
            return
        hdrs = parse_headers(headers)
        if not data and hdrs.get("Status") == "503":
            entry[0].set_result(NO_RESPONDERS)
            return
        entry[0].set_result(Reply("", "", data, hdrs))

    # -- send --------------------------------------------------------------------

    def publish(self, subject: str, reply: str, headers: dict[str, str], payload: bytes) -> bool:
        """Queue an HPUB; False if the connection is closed (nothing sent)."""
        nc = self.nc
        if nc.is_closed:
            return False
        hdr = encode_headers(headers)
        total = len(hdr) + len(payload)
        cmd = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
            subject.encode(),
            reply.encode(),
            len(hdr),
            total,
            hdr,
            payload,
        )
        nc._pending.append(cmd)
        nc._pending_data_size += len(cmd)
        stats = nc.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += len(payload)
        if nc.is_connected:
            fq = nc._flush_queue
            if fq is not None and fq.empty():
                # Wake nats-py's flusher; it resolves a future nobody waits on.
                fq.put_nowait(self._done)
        return True

    def request(
        self, subject: str, headers: dict[str, str], payload: bytes, timeout: float
    ) -> asyncio.Future[Reply | str]:
        """A future resolving to the :class:`Reply` or an outcome string.

        Never raises for NATS conditions: ``TIMEOUT``, ``NO_RESPONDERS``,
        ``UNAVAILABLE`` and ``VIOLATION`` come back as results.
        """
        loop = self.loop
        fut: asyncio.Future[Reply | str] = loop.create_future()
        self._seq += 1
        token = f"{self._seq:x}"
        self.waiters[token] = (fut, subject)
        timer = loop.call_later(timeout, _expire, fut)
        waiters = self.waiters

        def done(_f: asyncio.Future[Reply | str]) -> None:
            timer.cancel()
            waiters.pop(token, None)

        fut.add_done_callback(done)
        if not self.publish(subject, self._prefix + token, headers, payload):
            fut.set_result(UNAVAILABLE)
        return fut

    # -- failure fan-out -------------------------------------------------------------

    def fail_all(self, outcome: str = UNAVAILABLE) -> int:
        """Resolve every waiter (the connection dropped: their replies are lost)."""
        n = 0
        for fut, _ in list(self.waiters.values()):
            if not fut.done():
                fut.set_result(outcome)
                n += 1
        return n

    def fail_subject(self, subject: str, outcome: str = VIOLATION) -> int:
        """Resolve the waiters of requests the server refused to publish."""
        n = 0
        for fut, subj in list(self.waiters.values()):
            if subj == subject and not fut.done():
                fut.set_result(outcome)
                n += 1
        return n


def _expire(fut: asyncio.Future[Reply | str]) -> None:
    if not fut.done():
        fut.set_result(TIMEOUT)


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
