"""What both ends of a streamed call share: the idle clock and its beat.

Each end notes when it last heard from the other; every quarter of the idle
timeout (across namespaces at least every 30 s:
:func:`.protocol.beat_period`) it either gives up (nothing heard for a whole
timeout: the other sidecar, its app or NATS is gone) or sends a beat, so a
stream with nothing to say (an idle Server-Sent Events feed) is not taken
for a dead one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

from natsmesh_sidecar.transport.natsfast import Reply
from natsmesh_sidecar.transport.stream import protocol
from natsmesh_sidecar.transport.stream.receiver import Receiver
from natsmesh_sidecar.wire import StreamLimits

logger = logging.getLogger(__name__)

#: Every stream end of this process that is still referenced: a draining
#: sidecar waits for the open ones, then cuts what is left, telling the other
#: end (a stream that merely stopped would hang its peer until the idle
#: timeout). Weak: a finished end is nobody's to keep.
_ENDS: weakref.WeakSet[Peer] = weakref.WeakSet()


def open_ends() -> list[Peer]:
    """The stream ends not finished yet (callee and caller, bodies and tunnels)."""
    return [end for end in _ENDS if not end.finished]


class Peer:
    # Slots: a WebSocket tunnel (natsmesh_sidecar.transport.stream.tunnel) holds one per socket.
    __slots__ = (
        "__weakref__",
        "_timer",
        "crossing",
        "finished",
        "last_heard",
        "limits",
        "opened",
        "receiver",
    )

    def __init__(self, limits: StreamLimits) -> None:
        self.limits = limits
        self.finished = False
        self.last_heard = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        #: The receiving end of the direction that streams toward us, if any.
        self.receiver: Receiver | None = None
        #: The call crosses namespaces (protocol's module docstring): the
        #: callee answers on a reply mapping its beats keep alive
        #: (protocol.beat_period), the caller names its inbox once.
        self.crossing = False
        #: The caller named its inbox (its first credit), across namespaces.
        self.opened = False
        _ENDS.add(self)

    def on_message(self, msg: Reply) -> None:
        """A message from the other end: chunks to the receiver, the rest to :meth:`handle`."""
        if self.finished:
            return
        self.last_heard = time.monotonic()
        what = protocol.kind(msg.headers, msg.data)
        try:
            if what == protocol.CHUNK:
                if self.receiver is None:
                    raise protocol.StreamError("a chunk where no body streams")
                self.receiver.on_chunk(msg.headers, msg.data)
            elif what == protocol.ABORT:
                self.aborted(msg.headers.get(protocol.H_ABORT, ""))
            elif what != protocol.BEAT and what != protocol.END:
                self.handle(what, msg)
        except protocol.StreamError as exc:
            self.broken(str(exc))

    def handle(self, what: str, msg: Reply) -> None:
        """Any other message (a credit, a response head...); StreamError if out of place."""
        raise protocol.StreamError(f"unexpected {what} message")

    def aborted(self, reason: str) -> None:
        """The other end gave up."""
        raise NotImplementedError

    def cut(self, reason: str) -> None:
        """Break the stream here, telling the other end and our client or app."""
        raise NotImplementedError

    def broken(self, reason: str) -> None:
        """The other end broke the protocol."""
        raise NotImplementedError

    def reply_to_callee(self, inbox: bytes, *, credit: bool) -> bytes:
        """The reply subject of a caller's message to its callee: its inbox,
        but across namespaces on its first credit only (each would open a
        reply mapping in the callee's account; that one is where it answers)."""
        if not self.crossing:
            return inbox
        if credit and not self.opened:
            self.opened = True
            return inbox
        return b""

    def beat_s(self) -> float:
        return protocol.beat_period(self.limits, self.crossing)

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.beat_s(), self._tick)

    def _tick(self) -> None:
        if self.finished:
            return
        now = time.monotonic()
        if now - self.last_heard > self.limits.idle_timeout_s:
            self.silent()
            return
        stalled = self.stalled(now)
        if stalled:
            self.broken(stalled)
            return
        self.beat()
        self._arm()

    def _stop_clock(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def stalled(self, now: float) -> str | None:
        """Why the stream is stuck although the other end still beats, if it is."""
        return None

    def silent(self) -> None:
        """Nothing heard for the idle timeout."""
        raise NotImplementedError

    def beat(self) -> None:
        """Tell the other end we are here."""
        raise NotImplementedError
