"""Namespaces are accounts: nothing crosses unless exported and imported.

``shop`` runs the shop example; ``web`` has a ``frontend`` that ``orders``
admits as a caller (a service export/import) and an ``audit`` service that
subscribes to ``order.created`` across namespaces (consumer API exported by
shop, imported by web), and a ``spy`` that nobody admits.
"""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.aio.msg import Msg

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.desired import CallerRef, Publish, ServiceIntent, Subscribe
from natsmesh_operator.wiring.plan import MeshPlan, plan
from natsmesh_sidecar import subjects
from tests.fixtures.nats_operator import (
    OperatorNats,
    Probe,
    call,
    request_served,
    serve_as,
    shop_intents,
)

pytestmark = pytest.mark.integration


def mesh() -> list[ServiceIntent]:
    intents = [i for i in shop_intents("shop") if i.name != "orders"]
    intents.append(
        ServiceIntent(
            "shop",
            "orders",
            allow_same_namespace=False,
            allowed_callers=(
                CallerRef("gateway"),
                CallerRef("frontend", "web"),
                CallerRef("audit", "web"),
            ),
            publishes=(Publish("order.created"),),
        )
    )
    intents += [
        ServiceIntent("web", "frontend"),
        ServiceIntent(
            "web",
            "audit",
            subscriptions=(Subscribe("order.created", "orders", "/audit", namespace="shop"),),
        ),
        ServiceIntent("web", "spy"),
    ]
    return intents


async def applied(on: OperatorNats) -> MeshPlan:
    p = plan(mesh())
    assert not p.problems, p.problems
    async with on.applier() as a:
        report = await a.apply(p)
    assert report.ok, report.errors
    return p


async def connect(on: OperatorNats, p: MeshPlan, ns: str, svc: str) -> Probe:
    creds = users.issue(p.user(ns, svc), on.keyring.account(ns)).creds
    return await Probe.connect(on, creds, svc)


async def responder(on: OperatorNats, p: MeshPlan, ns: str, svc: str) -> Probe:
    probe = await connect(on, p, ns, svc)

    async def reply(msg: Msg) -> None:
        await msg.respond(f"{svc}.{ns}".encode())

    await serve_as(probe.nc, p, ns, svc, reply)
    return probe


async def test_cross_namespace_allowed_caller_works(nats_operator: OperatorNats) -> None:
    p = await applied(nats_operator)
    orders = await responder(nats_operator, p, "shop", "orders")
    frontend = await connect(nats_operator, p, "web", "frontend")
    try:
        reply = await request_served(frontend.nc, call("shop", "orders", "web", "frontend"))
        assert reply.data == b"orders.shop"
        assert not frontend.errors
        # spy, in the same namespace as frontend, may name only itself: nobody listens.
        spy = await connect(nats_operator, p, "web", "spy")
        with pytest.raises(nats.errors.NoRespondersError):
            await spy.nc.request(call("shop", "orders", "web", "spy"), b"", 2)
        forged = call("shop", "orders", "web", "frontend")
        await spy.nc.publish(forged, b"", reply=spy.nc.new_inbox())
        await spy.nc.flush()
        await spy.violation("publish", forged)
        await spy.close()
    finally:
        await frontend.close()
        await orders.close()


async def test_other_namespace_user_sees_nothing_not_imported(nats_operator: OperatorNats) -> None:
    p = await applied(nats_operator)
    payments = await responder(nats_operator, p, "shop", "payments")
    spy = await connect(nats_operator, p, "web", "spy")
    try:
        # Not in its permissions at all:
        for subject in (
            call("shop", "payments", "shop", "orders"),
            call("shop", "orders", "web", "frontend"),
            subjects.event_subject("shop", "orders", "order.created"),
        ):
            await spy.nc.publish(subject, b"")
            await spy.nc.flush()
            await spy.violation("publish", subject)
        for subject in ("mesh.shop.>", "events.shop.>", "_INBOX.>"):
            await spy.nc.subscribe(subject)
            await spy.nc.flush()
            await spy.violation("subscription", subject)
    finally:
        await spy.close()
        await payments.close()


async def test_account_boundary_holds_even_with_wide_permissions(
    nats_operator: OperatorNats,
) -> None:
    """An all-powerful user of web still cannot reach shop: the account is the wall."""
    from natsmesh_operator.wiring.apply import admin_creds

    p = await applied(nats_operator)
    payments = await responder(nats_operator, p, "shop", "payments")
    web_admin = await nats_operator.connect(admin_creds(nats_operator.keyring.account("web")))
    # Acting as orders (whose inbox payments may answer into).
    shop_admin = await nats_operator.connect(
        admin_creds(nats_operator.keyring.account("shop")),
        inbox_prefix=subjects.inbox_prefix("orders"),
    )
    seen: list[str] = []
    try:

        async def record(msg: Msg) -> None:
            seen.append(msg.subject)

        # No responder: payments is not imported into web, so it does not exist there.
        with pytest.raises(nats.errors.NoRespondersError):
            await web_admin.request(call("shop", "payments", "web", "frontend"), b"", 1)
        sub = await web_admin.subscribe(">", cb=record)
        await web_admin.flush()
        # Shop's own traffic never shows up in web.
        await shop_admin.publish(subjects.event_subject("shop", "orders", "order.created"), b"x")
        reply = await shop_admin.request(
            call("shop", "payments", "shop", "orders"),
            b"",
            2,
        )
        assert reply.data == b"payments.shop"
        await asyncio.sleep(0.2)
        assert not [s for s in seen if s.startswith(("mesh.shop", "events.shop"))]
        # web's JetStream cannot see shop's streams either.
        names = await web_admin.jetstream().streams_info()
        assert subjects.stream_name("orders") not in {s.config.name for s in names}
        await sub.unsubscribe()
    finally:
        await web_admin.close()
        await shop_admin.close()
        await payments.close()


async def test_cross_namespace_subscription_through_imported_consumer(
    nats_operator: OperatorNats,
) -> None:
    p = await applied(nats_operator)
    table = p.tables[("web", "audit")]
    (delivery,) = table.subscriptions
    assert delivery.api_prefix == subjects.imported_js_api_prefix("shop")
    assert delivery.consumer == subjects.consumer_name("audit", "orders", "order.created", "web")
    orders = await connect(nats_operator, p, "shop", "orders")
    audit = await connect(nats_operator, p, "web", "audit")
    try:
        await orders.nc.jetstream().publish(
            subjects.event_subject("shop", "orders", "order.created"), b'{"order": 7}'
        )
        js = audit.nc.jetstream(prefix=delivery.api_prefix)
        sub = await js.pull_subscribe_bind(delivery.consumer, delivery.stream)
        (msg,) = await sub.fetch(1, timeout=3)
        assert msg.data == b'{"order": 7}'
        await msg.ack_sync()
        assert not audit.errors
        # ...and the ack went through: nothing left to deliver.
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=1.5)
        # The web namespace's spy cannot use the same import.
        spy = await connect(nats_operator, p, "web", "spy")
        subject = f"{delivery.api_prefix}.CONSUMER.MSG.NEXT.{delivery.stream}.{delivery.consumer}"
        await spy.nc.publish(subject, b"{}")
        await spy.nc.flush()
        await spy.violation("publish", subject)
        await spy.close()
    finally:
        await orders.close()
        await audit.close()


def test_cross_namespace_subscription_needs_the_publishers_consent() -> None:
    intents = [
        *shop_intents("shop"),
        ServiceIntent(
            "web",
            "spy",
            subscriptions=(Subscribe("order.created", "orders", "/x", namespace="shop"),),
        ),
    ]
    p = plan(intents)
    (problem,) = p.problems
    assert (problem.namespace, problem.name, problem.reason) == (
        "web",
        "spy",
        "SubscriptionNotAllowed",
    )
    assert not p.tables[("web", "spy")].subscriptions
    assert not p.accounts["shop"].exports
