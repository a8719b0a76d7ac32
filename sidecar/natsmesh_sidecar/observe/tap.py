"""``natsmesh tap``, the sidecar's side: records of live requests, sent only while asked.

Imported on the first tap control message, never before: a sidecar nobody
taps holds one idle subscription (``natsmesh.tap.<ns>.<svc>.ctl``) and pays
one attribute check per request (``tap is None``).

A control message is JSON ``{"session": "<token>", "ttl": <seconds>}``: start
or renew that session for ``ttl`` seconds (at most :data:`MAX_TTL`), ``ttl`` 0
stops it; a message with a reply subject or headers is dropped before it
gets here (``Sidecar._on_tap_control``: JetStream delivers a tenant's stored
bodies with both). The CLI renews every few seconds, so a CLI that dies is forgotten
within its ttl. Each live session gets every record on
``natsmesh.tap.<ns>.<svc>.rec.<session>``; the records are rate-limited per
sidecar (:class:`RateLimit`), and what the limit dropped is counted in the
status record each control message is answered with.

Records carry no bodies and no header values: method, path without the
query string (it may hold tokens), status, latency, caller and callee,
request id, route and error code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

MAX_TTL = 30.0
"""A session lives at most this long without a renewal, whatever it asked."""
MAX_SESSIONS = 8
"""Concurrent sessions per sidecar (each costs one publish per record)."""
RATE = 100.0
"""Records per second per sidecar, on average."""
BURST = 100.0
_SESSION = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: The longest method, path and request id a record carries (what ``natsmesh
#: tap`` accepts): a caller chooses all three, and a record the CLI refused
#: would hide that request from the tap.
MAX_METHOD, MAX_PATH, MAX_REQUEST_ID = 32, 4096, 256


class RateLimit:
    """A token bucket: ``rate`` per second, at most ``burst`` at once."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float = RATE, burst: float = BURST, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def allow(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def parse_control(data: bytes) -> tuple[str, float] | None:
    """``(session, ttl)`` of a control message, None if it is not one."""
    try:
        msg = json.loads(data)
    except ValueError:
        return None
    if not isinstance(msg, dict):
        return None
    session, ttl = msg.get("session"), msg.get("ttl")
    if not isinstance(session, str) or not _SESSION.match(session):
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl != ttl:
        return None
    return session, max(0.0, min(float(ttl), MAX_TTL))


def record(
    *,
    instance: str,
    direction: str,
    method: str,
    path: str,
    status: int,
    duration_s: float,
    source: str,
    destination: str,
    request_id: str,
    route: str = "",
    error: str = "",
    ts: float | None = None,
) -> dict[str, Any]:
    """One request as the tap shows it (no body, no header values, no query)."""
    return {
        "kind": "request",
        "ts": round(time.time() if ts is None else ts, 3),
        "instance": instance,
        "direction": direction,
        "method": method[:MAX_METHOD],
        "path": path.split("?", 1)[0][:MAX_PATH],
        "status": status,
        "latencyMs": round(duration_s * 1000.0, 3),
        "source": source,
        "destination": destination,
        "requestId": request_id[:MAX_REQUEST_ID],
        "route": route,
        "error": error,
    }


class Tap:
    """The live sessions of one sidecar and the records sent to them.

    ``publish(subject, payload)`` sends one message (False: not sent);
    ``subject(session)`` is a session's records subject; ``activate(tap or
    None)`` installs this object on the request paths or removes it.
    """

    def __init__(
        self,
        *,
        instance: str,
        subject: Callable[[str], str],
        publish: Callable[[str, bytes], bool],
        activate: Callable[[Tap | None], None],
        clock: Callable[[], float] = time.monotonic,
        call_later: Callable[[float, Callable[[], None]], Any] | None = None,
        rate: float = RATE,
        burst: float = BURST,
    ) -> None:
        self.instance = instance
        self.subject = subject
        self.publish = publish
        self.activate = activate
        self.clock = clock
        self.call_later = call_later
        self.sessions: dict[str, float] = {}
        self.limit = RateLimit(rate, burst, clock())
        self.sent = 0
        self.dropped = 0
        self.earliest = float("inf")
        self._timer: Any = None

    @property
    def active(self) -> bool:
        return bool(self.sessions)

    def control(self, data: bytes) -> None:
        """Apply a control message, answer with a status record, (de)activate."""
        parsed = parse_control(data)
        if parsed is None:
            logger.debug("tap control message ignored: %r", data[:200])
            return
        session, ttl = parsed
        now = self.clock()
        self.expire(now)
        if ttl <= 0:
            self.sessions.pop(session, None)
        elif session in self.sessions or len(self.sessions) < MAX_SESSIONS:
            if not self.sessions:
                self.limit = RateLimit(self.limit.rate, self.limit.burst, now)
            self.sessions[session] = now + ttl
            self.publish(self.subject(session), self._status())
        else:
            logger.warning("tap session %s refused: %d sessions already", session, MAX_SESSIONS)
        self._changed()

    def expire(self, now: float) -> None:
        """Forget the sessions whose ttl ran out."""
        if now < self.earliest:
            return
        for session, until in list(self.sessions.items()):
            if until <= now:
                del self.sessions[session]
        self.earliest = min(self.sessions.values(), default=float("inf"))

    def _changed(self) -> None:
        self.earliest = min(self.sessions.values(), default=float("inf"))
        self.activate(self if self.sessions else None)
        self._schedule()

    def _schedule(self) -> None:
        """A timer at the next expiry, so an abandoned tap stops even with no traffic."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.sessions:
            return
        delay = max(0.0, self.earliest - self.clock()) + 0.01
        call_later = self.call_later or asyncio.get_running_loop().call_later
        self._timer = call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.expire(self.clock())
        self._changed()

    def _status(self) -> bytes:
        return json.dumps(
            {
                "kind": "status",
                "instance": self.instance,
                "sent": self.sent,
                "dropped": self.dropped,
                "rate": self.limit.rate,
            }
        ).encode()

    def request(self, **fields: Any) -> None:
        """A finished request (see :func:`record` for the fields)."""
        now = self.clock()
        if now >= self.earliest:
            self.expire(now)
            if not self.sessions:
                self._changed()
                return
        if not self.limit.allow(now):
            self.dropped += 1
            return
        payload = json.dumps(record(instance=self.instance, **fields)).encode()
        self.sent += 1
        for session in self.sessions:
            self.publish(self.subject(session), payload)
