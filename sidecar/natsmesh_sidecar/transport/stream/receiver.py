"""The receiving end of one direction of a stream: check, hand on, grant credit.

Chunks must come in order, without a gap, and add up to the announced
length: anything else is a :class:`~.protocol.StreamError` and the stream is
cut. Credit is granted only while the sink (a client's socket, the app's)
keeps up: a sink that stops draining stops the sender a window later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from natsmesh_sidecar.transport.stream import protocol

logger = logging.getLogger(__name__)


class Receiver:
    __slots__ = (
        "blocked",
        "deliver",
        "done",
        "expected",
        "finish",
        "granted",
        "last_chunk",
        "length",
        "received",
        "send_credit",
        "window",
    )

    def __init__(
        self,
        window: int,
        *,
        deliver: Callable[[bytes], None],
        finish: Callable[[], None],
        send_credit: Callable[[int], None],
        length: int | None = None,
    ) -> None:
        self.window = window
        self.deliver = deliver
        self.finish = finish
        self.send_credit = send_credit
        self.length = length
        self.expected = 0
        self.granted = 0
        self.received = 0
        self.blocked = False
        self.done = False
        self.last_chunk = time.monotonic()

    def open(self) -> int:
        """The first credit: a whole window."""
        self.granted = self.window
        return self.granted

    def on_chunk(self, headers: Mapping[str, str], data: bytes) -> None:
        """One chunk; raises :class:`~.protocol.StreamError` on a gap or a wrong length."""
        if self.done:
            raise protocol.StreamError("chunk after the last one")
        eof = protocol.check_chunk(self.expected, headers)
        self.expected += 1
        self.last_chunk = time.monotonic()
        self.received += len(data)
        if self.length is not None and self.received > self.length:
            raise protocol.StreamError(f"body longer than the announced {self.length} bytes")
        if eof and self.length is not None and self.received != self.length:
            raise protocol.StreamError(
                f"body ended at {self.received} of the announced {self.length} bytes"
            )
        if data:
            self.deliver(data)
        if eof:
            self.done = True
            self.finish()
            return
        self._grant()

    def set_blocked(self, blocked: bool) -> None:
        """The sink's write buffer is above (True) or back below (False) its mark."""
        self.blocked = blocked
        if not blocked:
            self.last_chunk = time.monotonic()  # the wait was ours, not the sender's
            self._grant()

    def _grant(self) -> None:
        if self.blocked or self.done:
            return
        credit = protocol.grant(self.expected, self.granted, self.window)
        if credit is not None:
            self.granted = credit
            self.send_credit(credit)
