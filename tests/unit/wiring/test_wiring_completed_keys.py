"""exactlyOnce's completed-key record in the plan: permissions, the bucket, its TTL."""

from __future__ import annotations

from dataclasses import replace

from natsmesh_operator.wiring.desired import CallerRef, Publish, ServiceIntent, Subscribe
from natsmesh_operator.wiring.jetstream import (
    DONE_MAX_MS,
    DONE_MIN_MS,
    done_stream_config,
    done_window_ms,
)
from natsmesh_operator.wiring.plan import plan
from natsmesh_sidecar import subjects
from natsmesh_sidecar.events.completed import key_token
from tests.fixtures.nats_operator import shop_intents

CONSUMER = "payments--orders--order_created"


def shop(delivery: str, **kw: object) -> list[ServiceIntent]:
    sub = Subscribe("order.created", "orders", "/e", delivery=delivery, **kw)  # type: ignore[arg-type]
    return [replace(i, subscriptions=(sub,)) if i.name == "payments" else i for i in shop_intents()]


def test_exactly_once_may_put_and_get_its_own_keys_only() -> None:
    p = plan(shop("exactlyOnce"))
    pub = p.user("shop", "payments").permissions.pub_allow
    done = [s for s in pub if subjects.DONE_BUCKET in s]
    assert done == [
        f"$KV.natsmesh-done.shop.{CONSUMER}.*",
        f"$JS.API.DIRECT.GET.KV_natsmesh-done.$KV.natsmesh-done.shop.{CONSUMER}.*",
    ]
    # Nothing that reads the bucket wholesale, nor subscribes to it.
    assert not any("STREAM.MSG.GET" in s or "CONSUMER.CREATE" in s for s in pub)
    sub = p.user("shop", "payments").permissions.sub_allow
    assert not any(subjects.DONE_BUCKET in s for s in sub)
    # inventory subscribes atLeastOnce: no record, no permission.
    inventory = p.user("shop", "inventory").permissions.pub_allow
    assert not any(subjects.DONE_BUCKET in s for s in inventory)
    assert [c.name for c in p.exactly_once_of("shop")] == [CONSUMER]


def test_at_least_once_pays_nothing() -> None:
    p = plan(shop("atLeastOnce"))
    assert p.exactly_once_of("shop") == ()
    for u in p.users:
        assert not any(subjects.DONE_BUCKET in s for s in u.permissions.pub_allow)


def test_the_record_lives_in_the_subscribers_account_scoped_by_the_source() -> None:
    """A subscriber in ``ops`` of ``shop``'s orders: its keys are kept in ops'
    account, under the publisher's namespace (two publishers of one name in
    two namespaces give it two consumers of one name)."""
    intents = [
        ServiceIntent(
            "shop",
            "orders",
            publishes=(Publish("order.created"),),
            allowed_callers=(CallerRef("audit", "ops"),),
        ),
        ServiceIntent(
            "ops",
            "audit",
            subscriptions=(
                Subscribe("order.created", "orders", "/e", "shop", delivery="exactlyOnce"),
            ),
        ),
    ]
    p = plan(intents)
    assert not p.problems, p.problems
    (consumer,) = p.exactly_once_of("ops")
    assert consumer.namespace == "shop"
    assert p.exactly_once_of("shop") == ()
    pub = p.user("ops", "audit").permissions.pub_allow
    assert f"$KV.natsmesh-done.shop.{consumer.name}.*" in pub


def test_window_covers_every_redelivery_and_has_a_floor_and_a_cap() -> None:
    c = plan(shop("exactlyOnce", max_deliver=10, ack_wait_ms=60_000, backoff_ms=(1000, 90_000)))
    (consumer,) = c.exactly_once_of("shop")
    assert done_window_ms([consumer]) == 10 * (60_000 + 90_000)
    short = plan(shop("exactlyOnce", max_deliver=2, ack_wait_ms=1000))
    assert done_window_ms(short.exactly_once_of("shop")) == DONE_MIN_MS
    huge = plan(shop("exactlyOnce", max_deliver=1000, ack_wait_ms=3_600_000))
    assert done_window_ms(huge.exactly_once_of("shop")) == DONE_MAX_MS
    cfg = done_stream_config(DONE_MIN_MS)
    assert cfg["max_age"] == DONE_MIN_MS * 1_000_000
    assert cfg["max_msgs_per_subject"] == 1
    assert cfg["allow_direct"] is True
    assert cfg["subjects"] == ["$KV.natsmesh-done.>"]


def test_key_token_is_a_fixed_length_kv_token_for_any_key() -> None:
    tokens = {key_token(k) for k in ("a", "a.b", "a b", "ü", "x" * 5000, "*", ">")}
    assert len(tokens) == 7
    for t in tokens:
        assert len(t) == 43
        assert all(ch.isalnum() or ch in "-_" for ch in t)
