"""The sending end of one direction of a stream: buffer, chunk, send within credit.

The source (a client's upload, an app's response body) feeds bytes as they
arrive; they leave as numbered chunks while the receiver's credit allows,
at once (a Server-Sent Event is not held back to fill a chunk) and merged
into larger chunks while credit is short. Above ``high`` bytes buffered the
source is paused (its socket stops being read), below one chunk resumed: so
what a stream holds is bounded by the window plus ``high``, whatever the
body's size.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from natsmesh_sidecar.transport.stream import protocol

logger = logging.getLogger(__name__)

#: (header block, payload) -> False if the connection is gone.
Publish = Callable[[bytes, bytes], bool]


class Sender:
    __slots__ = (
        "buf",
        "buffered",
        "chunk_bytes",
        "credit",
        "ended",
        "eof_sent",
        "high",
        "next_seq",
        "pause",
        "paused",
        "publish",
        "resume",
        "sent_bytes",
    )

    def __init__(
        self,
        chunk_bytes: int,
        *,
        pause: Callable[[], None],
        resume: Callable[[], None],
        high: int | None = None,
    ) -> None:
        self.chunk_bytes = chunk_bytes
        self.high = 2 * chunk_bytes if high is None else high
        self.pause = pause
        self.resume = resume
        self.publish: Publish | None = None
        self.buf: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.next_seq = 0
        self.credit = 0
        self.ended = False
        self.eof_sent = False
        self.paused = False
        self.sent_bytes = 0

    def bind(self, publish: Publish, credit: int) -> None:
        """Where chunks go, from the receiver's first credit on."""
        self.publish = publish
        self.on_credit(credit)

    def feed(self, data: bytes) -> None:
        if not data or self.ended:
            return
        self.buf.append(data)
        self.buffered += len(data)
        self._pump()
        if not self.paused and self.buffered > self.high:
            self.paused = True
            self.pause()

    def end(self) -> None:
        """The source is complete: the last chunk says so."""
        if not self.ended:
            self.ended = True
            self._pump()

    def on_credit(self, credit: int) -> None:
        if credit > self.credit:
            self.credit = credit
        self._pump()

    def _take(self) -> bytes:
        """Up to one chunk from the front of the buffer."""
        size = self.chunk_bytes
        buf = self.buf
        first = buf[0]
        if len(first) >= size:
            if len(first) == size:
                buf.popleft()
                out = first
            else:
                out, buf[0] = first[:size], first[size:]
            self.buffered -= size
            return out
        parts = []
        n = 0
        while buf and n + len(buf[0]) <= size:
            piece = buf.popleft()
            parts.append(piece)
            n += len(piece)
        if buf and n < size:
            piece = buf[0]
            parts.append(piece[: size - n])
            buf[0] = piece[size - n :]
            n = size
        self.buffered -= n
        return b"".join(parts)

    def _pump(self) -> None:
        publish = self.publish
        if publish is None:
            return
        while self.next_seq < self.credit and not self.eof_sent:
            if self.buffered:
                payload = self._take()
            elif self.ended:
                payload = b""
            else:
                break
            eof = self.ended and not self.buffered
            if not publish(protocol.chunk_block(self.next_seq, eof), payload):
                return
            self.next_seq += 1
            self.sent_bytes += len(payload)
            self.eof_sent = eof
        if self.paused and self.buffered <= self.chunk_bytes:
            self.paused = False
            self.resume()
