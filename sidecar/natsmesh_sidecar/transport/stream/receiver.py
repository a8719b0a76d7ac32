"""The receiving end of one direction of a stream: check, hand on, grant credit.

Chunks must come in order, without a gap, and add up to the announced
length: anything else is a :class:`~.protocol.StreamError` and the stream is
cut. Credit is granted only while the sink (a client's socket, the app's)
keeps up: a sink that stops draining stops the sender a window later.

On the callee a request body's receiver also keeps its
:class:`~natsmesh_sidecar.transport.budget.Hold` of the sidecar's byte
budget: one chunk for each chunk of credit not used yet and each written
to a sink that has not taken it (at least one while the body is open); it
grants credit only as far as the hold may grow, and always at least the
one chunk, so a call is slowed by a full budget, never stuck.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from natsmesh_sidecar.transport.stream import protocol

if TYPE_CHECKING:
    from natsmesh_sidecar.transport.budget import Hold

logger = logging.getLogger(__name__)


class Receiver:
    __slots__ = (
        "blocked",
        "deliver",
        "done",
        "drained",
        "expected",
        "finish",
        "granted",
        "hold",
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
        hold: Hold | None = None,
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
        #: Chunks the sink has taken (all that came while it was not blocked).
        self.drained = 0
        self.hold = hold
        if hold is not None:
            hold.adopted = True

    def open(self) -> int:
        """The first credit: a whole window, or what the hold may grow to."""
        hold = self.hold
        if hold is None:
            self.granted = self.window
        else:
            self.granted = max(1, min(self.window, hold.room() // hold.chunk))
            self._settle()
        return self.granted

    def close(self) -> None:
        """The stream is over: nothing more comes, the sink is gone."""
        self.done = True
        hold, self.hold = self.hold, None
        if hold is not None:
            hold.close()

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
            if self.hold is not None:
                self._settle()
            return
        self._grant()

    def set_blocked(self, blocked: bool) -> None:
        """The sink's write buffer is above (True) or back below (False) its mark."""
        self.blocked = blocked
        if not blocked:
            self.last_chunk = time.monotonic()  # the wait was ours, not the sender's
            if self.done and self.hold is not None:
                self._settle()  # what the sink held after the last chunk is taken
            self._grant()

    def _grant(self) -> None:
        if self.blocked or self.done:
            return
        credit = protocol.grant(self.expected, self.granted, self.window)
        hold = self.hold
        if hold is not None:
            self.drained = self.expected
            if credit is not None:
                # Not blocked: nothing is in the sink, the hold backs credit only.
                credit = min(credit, self.expected + hold.room() // hold.chunk)
                if credit <= self.granted:
                    credit = None
        if credit is not None:
            self.granted = credit
            self.send_credit(credit)
        if hold is not None:
            self._settle()

    def _settle(self) -> None:
        """Size the hold to what the body may still make us keep."""
        hold = self.hold
        assert hold is not None
        if not self.blocked:
            self.drained = self.expected
        # Open: the credit left and what the sink holds, at least a chunk.
        # Done: what the sink holds.
        left = self.granted - self.drained
        chunks = self.expected - self.drained if self.done else max(1, left)
        size = chunks * hold.chunk
        if size != hold.size:
            hold.resize(size)
