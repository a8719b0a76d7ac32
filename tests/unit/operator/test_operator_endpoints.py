"""Event-driven endpoint counts: advisory parsing, coalescing, which statuses change."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from natsmesh_operator.handlers.coalesce import Coalescer
from natsmesh_operator.handlers.presence import advisory, endpoint_changes
from natsmesh_operator.wiring import jwt
from natsmesh_operator.wiring.apply import admin_creds
from natsmesh_operator.wiring.keys import Key, KeyRing, Role

pytestmark = pytest.mark.unit


def event(account: Key, token: str, kind: str = "CONNECT") -> tuple[str, bytes]:
    user = jwt.decode(token, verify_signature=False).subject
    client = {"acc": account.public, "user": user, "jwt": token}
    body = {"type": "io.nats.server.advisory.v1.client_connect", "client": client}
    return f"$SYS.ACCOUNT.{account.public}.{kind}", json.dumps(body).encode()


def test_a_service_users_advisory_names_its_account() -> None:
    account = Key.create(Role.ACCOUNT)
    user = Key.create(Role.USER)
    token = jwt.encode({"sub": user.public, "name": "shop/orders", "nats": {}}, account)
    assert advisory(*event(account, token)) == (account.public, True, user.public)
    # A disconnect names the user key too: the last one of a key whose
    # revocation is held ends the hold.
    assert advisory(*event(account, token, "DISCONNECT")) == (account.public, False, user.public)


def test_the_operators_own_connections_and_garbage_are_ignored() -> None:
    account = Key.create(Role.ACCOUNT)
    own, _ = jwt.parse_creds(admin_creds(account))
    # Every count connects as an admin user: reacting to it would loop.
    assert advisory(*event(account, own)) is None
    assert advisory("$SYS.ACCOUNT.A.CONNECT", b"not json") is None
    assert advisory("$SYS.ACCOUNT.A.CONNECT", b'{"client": {}}') is None


def test_keyring_maps_account_keys_to_namespaces() -> None:
    ring = KeyRing()
    shop, web = ring.account("shop"), ring.account("web")
    ring.user("shop", "orders")
    assert ring.namespaces() == ["shop", "web"]
    assert ring.accounts_by_key() == {shop.public: "shop", web.public: "web"}


def body(
    name: str, endpoints: int | None, *, service: str = "orders", version: str = "v1"
) -> dict[str, Any]:
    status = {} if endpoints is None else {"endpoints": endpoints}
    return {
        "apiVersion": "natsmesh.io/v1alpha1",
        "kind": "NatsService",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "service": service,
            "version": version,
            "selector": {"matchLabels": {"a": "b"}},
            "port": 8080,
        },
        "status": status,
    }


def test_only_changed_counts_are_written() -> None:
    services = [
        body("orders", 2),
        body("orders-v2", None, version="v2"),
        body("web", 1, service="web"),
    ]
    counts = {("orders", "v1"): 2, ("orders", "v2"): 3}
    # orders unchanged; v2 never counted; web gone to 0.
    assert endpoint_changes(counts, services) == {"orders-v2": 3, "web": 0}


async def test_a_burst_of_marks_is_one_run_and_runs_are_spaced() -> None:
    runs: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()

    async def work(key: str) -> None:
        runs.append((key, loop.time()))

    c = Coalescer(work, settle=0.05, gap=0.3)
    start = loop.time()
    for _ in range(100):
        c.mark("shop")
    c.mark("web")
    await asyncio.sleep(0.15)
    assert sorted(k for k, _ in runs) == ["shop", "web"]
    # A mark after a run: served, but not sooner than the gap.
    c.mark("shop")
    await asyncio.sleep(0.4)
    assert not c.pending()
    shop = [t - start for k, t in runs if k == "shop"]
    assert len(shop) == 2
    assert shop[1] - shop[0] >= 0.3
    assert c.ran_within("shop", 1.0)
    assert not c.ran_within("ops", 1.0)
    await c.stop()


async def test_a_follow_up_mark_runs_again_later_and_stop_cancels_it() -> None:
    runs: list[str] = []

    async def work(key: str) -> None:
        runs.append(key)

    c = Coalescer(work, settle=0.01, gap=0.01)
    c.mark("shop", again_after=0.1)
    await asyncio.sleep(0.05)
    assert runs == ["shop"]
    await asyncio.sleep(0.15)
    assert runs == ["shop", "shop"]
    c.mark("shop", again_after=0.1)
    await c.stop()
    await asyncio.sleep(0.15)
    assert runs == ["shop", "shop"]


async def test_a_failing_run_does_not_stop_later_ones() -> None:
    calls = 0

    async def work(key: str) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("NATS down")

    c = Coalescer(work, settle=0.01, gap=0.01)
    c.mark("shop")
    await asyncio.sleep(0.05)
    c.mark("shop")
    await asyncio.sleep(0.05)
    assert calls == 2
    await c.stop()
