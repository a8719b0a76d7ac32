"""The callee's byte budget: what its callers may make it hold at once.

One per sidecar (natsmesh_sidecar.calls.inbound, ``NATSMESH_INBOUND_MAX_BYTES``).
In it: the bodies of unary requests in hand (the backlog and the calls in
flight), and for each streamed request body a :class:`Hold`: what its
receiver (natsmesh_sidecar.transport.stream.receiver) may have to keep, a
chunk for each chunk of credit the caller has not used yet and for each
chunk written to an app that has not taken it, and at least one chunk
while the body is open (the app socket's buffer below its mark, and the
chunk of credit a call always keeps).

A streamed call is refused only when its first chunk does not fit; what it
may send beyond that is credit, granted as far as the budget allows and
withheld (backpressure) when it is full. Credit beyond each body's first
chunk comes from a share of the budget (:data:`EXTRA_SHARE`), so calls that
run at full speed, or sit on a window they do not use, leave the rest to
the first chunks of other calls. Pure bookkeeping: no I/O, no clock.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

#: The part of the budget (1/n) that credit beyond each body's first chunk
#: may take in all: a quarter, two windows of 8 x 128 KiB of the default
#: 8 MiB, leaves three quarters (48 chunks) for the first chunks of calls.
EXTRA_SHARE = 4


class Budget:
    """Bytes held for callers, against ``capacity``; ``used`` is read and
    written directly by the unary path (its hot loop)."""

    __slots__ = ("capacity", "extra", "extra_cap", "used")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        #: Of ``used``: the holds' bytes beyond their first chunk.
        self.extra = 0
        self.extra_cap = capacity // EXTRA_SHARE

    def admits(self, size: int) -> bool:
        """Whether ``size`` more bytes fit. Anything fits when nothing is held:
        a budget below one message (or one chunk) must not starve the service."""
        return not self.used or self.used + size <= self.capacity

    def hold(self, chunk: int) -> Hold | None:
        """The first chunk of a streamed body, or None if it does not fit."""
        if not self.admits(chunk):
            return None
        self.used += chunk
        return Hold(self, chunk)


class Hold:
    """What one streamed body holds of a :class:`Budget`, in whole chunks.

    Made by the inbound handler when the call is admitted; its receiver
    takes it over (``adopted``) and resizes it as credit is granted and
    used; whoever holds it last closes it.
    """

    __slots__ = ("adopted", "budget", "chunk", "size")

    def __init__(self, budget: Budget, chunk: int) -> None:
        self.budget = budget
        self.chunk = chunk
        self.size = chunk
        self.adopted = False

    def room(self) -> int:
        """The most this hold may grow to now: within the budget, and beyond
        its first chunk within the extra share; never less than it holds."""
        budget, chunk, size = self.budget, self.chunk, self.size
        others_extra = budget.extra - max(0, size - chunk)
        by_total = budget.capacity - (budget.used - size)
        by_extra = chunk + budget.extra_cap - others_extra
        return max(size, min(by_total, by_extra))

    def resize(self, size: int) -> None:
        budget, chunk = self.budget, self.chunk
        budget.used += size - self.size
        budget.extra += max(0, size - chunk) - max(0, self.size - chunk)
        self.size = size

    def close(self) -> None:
        self.resize(0)
