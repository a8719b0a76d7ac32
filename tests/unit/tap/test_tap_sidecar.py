"""The sidecar's tap without a server: control messages, expiry, the rate limit, records."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from natsmesh_sidecar.observe import tap
from natsmesh_sidecar.observe.tap import RateLimit, Tap, parse_control

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """A Tap with a fake clock and timer; what it published and installed."""

    def __init__(self, rate: float = 100.0, burst: float = 100.0) -> None:
        self.clock = Clock()
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.installed: list[Tap | None] = []
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.tap = Tap(
            instance="pod-a",
            subject=lambda s: f"rec.{s}",
            publish=self.publish,
            activate=self.installed.append,
            clock=self.clock,
            call_later=self.call_later,
            rate=rate,
            burst=burst,
        )

    def publish(self, subject: str, payload: bytes) -> bool:
        self.sent.append((subject, json.loads(payload)))
        return True

    def call_later(self, delay: float, cb: Callable[[], None]) -> object:
        self.timers.append((self.clock.now + delay, cb))

        class Handle:
            def cancel(_self) -> None:
                self.timers.remove((when, cb))

        when = self.clock.now + delay
        return Handle()

    def control(self, session: str, ttl: float) -> None:
        self.tap.control(json.dumps({"session": session, "ttl": ttl}).encode())

    def request(self, **extra: Any) -> None:
        fields: dict[str, Any] = {
            "direction": "inbound",
            "method": "POST",
            "path": "/charge?token=secret",
            "status": 200,
            "duration_s": 0.0032,
            "source": "orders.shop",
            "destination": "payments.shop",
            "request_id": "rid-1",
        }
        self.tap.request(**{**fields, **extra})

    def requests(self) -> list[tuple[str, dict[str, Any]]]:
        return [(s, r) for s, r in self.sent if r["kind"] == "request"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"session": "abc", "ttl": 10}', ("abc", 10.0)),
        (b'{"session": "abc", "ttl": 3600}', ("abc", tap.MAX_TTL)),
        (b'{"session": "abc", "ttl": -5}', ("abc", 0.0)),
        (b'{"session": "a.b", "ttl": 10}', None),  # a subject token, no dots or wildcards
        (b'{"session": "*", "ttl": 10}', None),
        (b'{"session": "' + b"x" * 65 + b'", "ttl": 10}', None),
        (b'{"session": "abc", "ttl": true}', None),
        (b'{"session": "abc", "ttl": "10"}', None),
        (b'{"session": "abc", "ttl": NaN}', None),
        (b"not json", None),
        (b"[]", None),
    ],
)
def test_control_messages_are_parsed_strictly(raw: bytes, expected: object) -> None:
    assert parse_control(raw) == expected


def test_nothing_is_recorded_until_a_session_starts() -> None:
    rig = Rig()
    assert not rig.tap.active
    rig.control("s1", 10)
    assert rig.installed == [rig.tap]
    # The start is answered with a status on the session's subject.
    assert rig.sent[0][0] == "rec.s1"
    assert rig.sent[0][1]["kind"] == "status"
    rig.request()
    ((subject, rec),) = rig.requests()
    assert subject == "rec.s1"
    assert rec == {
        "kind": "request",
        "ts": rec["ts"],
        "instance": "pod-a",
        "direction": "inbound",
        "method": "POST",
        "path": "/charge",  # the query string may hold tokens: never sent
        "status": 200,
        "latencyMs": 3.2,
        "source": "orders.shop",
        "destination": "payments.shop",
        "requestId": "rid-1",
        "route": "",
        "error": "",
    }


def test_a_session_not_renewed_expires_by_timer_and_on_the_request_path() -> None:
    rig = Rig()
    rig.control("s1", 10)
    rig.clock.now += 6
    rig.control("s1", 10)  # renewed: lives until now + 10
    rig.clock.now += 9
    rig.request()
    assert len(rig.requests()) == 1
    # No traffic: the timer at the deadline uninstalls the tap.
    ((when, cb),) = rig.timers
    rig.clock.now = when
    cb()
    assert rig.installed[-1] is None
    assert not rig.tap.active
    # A request that raced the timer is not recorded either.
    rig2 = Rig()
    rig2.control("s1", 5)
    rig2.clock.now += 5.5
    rig2.request()
    assert rig2.requests() == []
    assert rig2.installed[-1] is None


def test_ttl_zero_stops_one_session_and_the_others_keep_theirs() -> None:
    rig = Rig()
    rig.control("a", 10)
    rig.control("b", 10)
    rig.request()
    assert sorted(s for s, _ in rig.requests()) == ["rec.a", "rec.b"]
    rig.control("a", 0)
    rig.sent.clear()
    rig.request()
    assert [s for s, _ in rig.requests()] == ["rec.b"]
    rig.control("b", 0)
    assert rig.installed[-1] is None
    assert rig.timers == []


def test_sessions_are_bounded() -> None:
    rig = Rig()
    for i in range(tap.MAX_SESSIONS + 3):
        rig.control(f"s{i}", 10)
    assert len(rig.tap.sessions) == tap.MAX_SESSIONS
    rig.control("s0", 10)  # renewing one it has still works
    assert rig.tap.sessions["s0"] == rig.clock.now + 10


def test_rate_limit_drops_and_counts_and_the_status_tells() -> None:
    rig = Rig(rate=100, burst=100)
    rig.control("s1", 10)
    for _ in range(250):
        rig.request()
    assert len(rig.requests()) == 100
    assert rig.tap.dropped == 150
    rig.clock.now += 0.5  # 50 more tokens
    for _ in range(80):
        rig.request()
    assert len(rig.requests()) == 150
    assert rig.tap.dropped == 180
    rig.control("s1", 10)  # the renewal's status carries the count
    assert rig.sent[-1][1] == {
        "kind": "status",
        "instance": "pod-a",
        "sent": 150,
        "dropped": 180,
        "rate": 100,
    }


def test_token_bucket() -> None:
    bucket = RateLimit(rate=10, burst=2, now=0.0)
    assert [bucket.allow(0.0) for _ in range(3)] == [True, True, False]
    assert bucket.allow(0.05) is False  # half a token
    assert bucket.allow(0.1) is True
    assert [bucket.allow(10.0) for _ in range(3)] == [True, True, False]  # capped at burst
