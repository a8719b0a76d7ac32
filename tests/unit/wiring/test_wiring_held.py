"""Held revocations: when an old key is due, what survives a restart, what a server says."""

from __future__ import annotations

import json

import pytest

from natsmesh_operator.wiring.held import Held, HeldRevocations, connections_in, due
from natsmesh_operator.wiring.keys import Key, Role

pytestmark = pytest.mark.unit

T0 = 1_800_000_000


def user() -> str:
    return Key.create(Role.USER).public


def test_a_held_key_is_due_when_unused_expired_or_its_service_gone() -> None:
    h = Held("shop", user(), "orders", since=T0, until=T0 + 90)
    # Its sidecars still use it (or nobody could tell): held.
    assert due(h, now=T0 + 5, connections=2, live=True) is None
    assert due(h, now=T0 + 5, connections=None, live=True) is None
    # The last connection moved to the new creds: revoked at once.
    assert due(h, now=T0 + 5, connections=0, live=True) == "no connection uses it"
    # Bounded whatever the connections say (an attacker may hold one open).
    assert due(h, now=T0 + 90, connections=3, live=True) == "grace expired"
    assert due(h, now=T0 + 90, connections=None, live=True) == "grace expired"
    assert due(h, now=T0 + 5, connections=3, live=False) == "service deleted"


def test_holding_again_never_extends_the_grace() -> None:
    held = HeldRevocations()
    old = user()
    first = held.hold("shop", old, "orders", now=T0, grace=90)
    assert (first.since, first.until) == (T0, T0 + 90)
    # The re-issue is retried, or the old creds were put back into the Secret
    # and narrowed again: the first deadline stands.
    again = held.hold("shop", old, "orders", now=T0 + 60, grace=90)
    assert again.until == T0 + 90
    assert len(held) == 1
    assert old in held
    held.remove(again)
    assert old not in held
    assert not len(held)


def test_held_entries_survive_a_dump_and_load() -> None:
    held = HeldRevocations()
    a, b = user(), user()
    held.hold("shop", a, "orders", now=T0, grace=90)
    held.hold("web", b, "site", now=T0 + 1, grace=30)
    loaded = HeldRevocations.load(held.dump())
    assert list(loaded) == list(held)
    assert loaded.dump() == held.dump()


def test_a_damaged_record_is_due_at_once_and_garbage_is_dropped() -> None:
    good, damaged = user(), user()
    raw = json.dumps(
        {
            "shop": {
                good: {"service": "orders", "since": T0, "until": T0 + 90},
                damaged: {"service": "orders", "until": "soon"},
                "not-a-key": {"service": "x", "since": T0, "until": T0 + 90},
                Key.create(Role.ACCOUNT).public: {"since": T0, "until": T0 + 90},
            },
            "web": "nonsense",
        }
    )
    loaded = {h.user: h for h in HeldRevocations.load(raw)}
    assert set(loaded) == {good, damaged}
    # Fail closed: a held key whose deadline cannot be read is revoked next pass.
    assert due(loaded[damaged], now=T0, connections=5, live=True) == "grace expired"
    assert due(loaded[good], now=T0, connections=5, live=True) is None
    assert not list(HeldRevocations.load("not json"))


def test_a_servers_connz_answer_is_read_or_refused() -> None:
    def answer(body: object) -> bytes:
        return json.dumps(body).encode()

    assert connections_in(answer({"server": {}, "data": {"num_connections": 2}})) == 2
    assert connections_in(answer({"server": {}, "data": {"num_connections": 0}})) == 0
    # Errors and anything unreadable are "unknown", never "no connection".
    assert connections_in(answer({"error": {"code": 500, "description": "x"}})) is None
    assert connections_in(answer({"data": {}})) is None
    assert connections_in(answer({"data": {"num_connections": -1}})) is None
    assert connections_in(b"not json") is None
