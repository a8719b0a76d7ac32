"""Applying plans: idempotency, minimal change, drift repair, explicit pruning."""

from __future__ import annotations

from dataclasses import replace

import pytest

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.apply import admin_creds
from natsmesh_operator.wiring.desired import CallerRef, ServiceIntent, Subscribe
from natsmesh_operator.wiring.plan import plan
from natsmesh_sidecar import subjects
from tests.fixtures.nats_operator import OperatorNats, shop_intents

pytestmark = pytest.mark.integration


def with_change(intents: list[ServiceIntent], name: str, **changes: object) -> list[ServiceIntent]:
    return [replace(i, **changes) if i.name == name else i for i in intents]  # type: ignore[arg-type]


async def test_reapplying_the_same_plan_changes_nothing(nats_operator: OperatorNats) -> None:
    p = plan(shop_intents())
    async with nats_operator.applier() as a:
        first = await a.apply(p)
        assert first.ok
        assert first.changed
        assert first.accounts_pushed == ["shop"]
        assert len(first.consumers_created) == 2
        second = await a.apply(plan(shop_intents()))
    assert second.ok, second.errors
    assert second.changes == {}
    assert second.accounts_unchanged == ["shop"]
    assert len(second.streams_unchanged) == 4  # EVENTS_orders, 2 DLQ, the KV bucket
    assert len(second.consumers_unchanged) == 2
    assert len(second.kv_unchanged) == 8  # four tables, four targets


async def test_changing_one_subscription_touches_only_its_consumer_and_table(
    nats_operator: OperatorNats,
) -> None:
    intents = shop_intents()
    async with nats_operator.applier() as a:
        await a.apply(plan(intents))
        changed = with_change(
            intents,
            "inventory",
            subscriptions=(
                Subscribe("order.created", "orders", "/events/order-created", max_deliver=9),
            ),
        )
        report = await a.apply(plan(changed))
    assert report.ok, report.errors
    consumer = subjects.consumer_name("inventory", "orders", "order.created")
    assert report.changes == {
        "consumers_updated": [f"shop/EVENTS_orders/{consumer}"],
        "kv_put": ["shop/inventory"],
    }


async def test_new_cross_namespace_caller_pushes_only_the_two_accounts(
    nats_operator: OperatorNats,
) -> None:
    intents = [*shop_intents(), ServiceIntent("web", "frontend"), ServiceIntent("ops", "pager")]
    async with nats_operator.applier() as a:
        await a.apply(plan(intents))
        changed = with_change(
            intents, "payments", allowed_callers=(CallerRef("orders"), CallerRef("frontend", "web"))
        )
        report = await a.apply(plan(changed))
    assert report.ok, report.errors
    assert sorted(report.accounts_pushed) == ["shop", "web"]
    assert report.accounts_unchanged == ["ops"]
    # frontend's table gains a destination; nobody else's table changes.
    assert report.kv_put == ["web/frontend"]
    assert not report.streams_updated
    assert not report.consumers_updated


async def test_drift_is_repaired(nats_operator: OperatorNats) -> None:
    p = plan(shop_intents())
    async with nats_operator.applier() as a:
        await a.apply(p)
        nc = await nats_operator.connect(admin_creds(nats_operator.keyring.account("shop")))
        js = nc.jetstream()
        consumer = subjects.consumer_name("payments", "orders", "order.created")
        await js.delete_consumer("EVENTS_orders", consumer)
        info = await js.stream_info("DLQ_inventory")
        info.config.max_age = 3600.0
        await js.update_stream(info.config)
        kv = await js.key_value(subjects.ROUTES_BUCKET)
        await kv.put("orders", b"{}")
        await nc.close()
        report = await a.apply(p)
    assert report.ok, report.errors
    assert report.changes == {
        "streams_updated": ["shop/DLQ_inventory"],
        "consumers_created": [f"shop/EVENTS_orders/{consumer}"],
        "kv_put": ["shop/orders"],
    }


async def test_data_losing_change_is_reported_not_done(nats_operator: OperatorNats) -> None:
    from natsmesh_operator.wiring.desired import Publish, StreamSettings

    intents = shop_intents()
    async with nats_operator.applier() as a:
        await a.apply(plan(intents))
        changed = with_change(
            intents,
            "orders",
            publishes=(Publish("order.created", StreamSettings(storage="memory")),),
        )
        report = await a.apply(plan(changed))
    (error,) = report.errors
    assert error.what == "stream EVENTS_orders"
    assert "storage" in error.message
    assert not report.streams_updated


async def test_prune_removes_only_what_is_gone(nats_operator: OperatorNats) -> None:
    intents = [*shop_intents(), ServiceIntent("web", "frontend")]
    async with nats_operator.applier() as a:
        await a.apply(plan(intents))
        web_key = nats_operator.keyring.account("web")
        frontend = users.issue(plan(intents).user("web", "frontend"), web_key)
        without = [
            i for i in intents if i.name not in {"inventory", "frontend"}
        ]  # inventory leaves shop; web has no services left
        not_pruned = await a.apply(plan(without))
        assert not not_pruned.accounts_deleted
        assert not not_pruned.consumers_deleted
        report = await a.apply(plan(without), prune=True)
        assert report.ok, report.errors
        assert report.accounts_deleted == ["web"]
        assert report.streams_deleted == ["shop/DLQ_inventory", "web/KV_natsmesh-routes"]
        consumer = subjects.consumer_name("inventory", "orders", "order.created")
        assert report.consumers_deleted == [f"shop/EVENTS_orders/{consumer}"]
        assert report.kv_deleted == ["shop/inventory", "shop/to.inventory"]
        assert web_key.public not in await a.list_accounts()
        again = await a.apply(plan(without), prune=True)
        assert again.changes == {}
    with pytest.raises(Exception, match=r"[Aa]uthoriz"):
        await nats_operator.connect(frontend.creds)


async def test_many_namespaces_all_get_jetstream(nats_operator: OperatorNats) -> None:
    """Accounts must not reserve storage: with 10 GiB each, a 54 GB server gave five
    namespaces JetStream and the rest 'insufficient storage resources' (10047)."""
    from natsmesh_operator.wiring.desired import Publish

    namespaces = [f"team-{i}" for i in range(12)]
    intents = [
        ServiceIntent(ns, "orders", publishes=(Publish("order.created"),)) for ns in namespaces
    ]
    async with nats_operator.applier() as a:
        report = await a.apply(plan(intents))
    assert report.ok, report.errors
    assert sorted(report.accounts_pushed) == sorted(namespaces)
    created = {s.split("/")[0] for s in report.streams_created if s.endswith("/EVENTS_orders")}
    assert created == set(namespaces)
