"""Durable consumers per subscription and the dead-letter path.

Dead letters are published by the subscriber's sidecar: when the delivery
with number ``maxDeliver`` fails too, it publishes the message (original
headers plus ``Natsmesh-*`` context) to ``Delivery.dead_letter_subject`` with
a JetStream publish, then ``term`` s it. The ``DLQ_<service>`` stream the
operator made keeps it. The server stops redelivering after ``maxDeliver``
anyway and says so in a ``MAX_DELIVERIES`` advisory.
"""

from __future__ import annotations

import asyncio
import json

import nats
import pytest
from nats.aio.msg import Msg

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.apply import admin_creds
from natsmesh_operator.wiring.desired import Subscribe
from natsmesh_operator.wiring.plan import MeshPlan, plan
from natsmesh_sidecar import subjects
from tests.fixtures.nats_operator import OperatorNats, Probe, shop_intents

pytestmark = pytest.mark.integration

EVENT = subjects.event_subject("shop", "orders", "order.created")


def shop_with(sub: Subscribe) -> list[object]:
    from dataclasses import replace

    return [replace(i, subscriptions=(sub,)) if i.name == "payments" else i for i in shop_intents()]


async def setup(on: OperatorNats, sub: Subscribe) -> tuple[MeshPlan, Probe, Probe]:
    p = plan(shop_with(sub))  # type: ignore[arg-type]
    assert not p.problems
    async with on.applier() as a:
        assert (await a.apply(p)).ok
    account = on.keyring.account("shop")
    orders = await Probe.connect(on, users.issue(p.user("shop", "orders"), account).creds, "orders")
    payments = await Probe.connect(
        on, users.issue(p.user("shop", "payments"), account).creds, "payments"
    )
    return p, orders, payments


async def test_consumer_carries_the_subscription_settings(nats_operator: OperatorNats) -> None:
    sub = Subscribe(
        "order.created", "orders", "/e", max_deliver=4, ack_wait_ms=1500, backoff_ms=(100, 2000)
    )
    p, orders, payments = await setup(nats_operator, sub)
    (delivery,) = p.tables[("shop", "payments")].subscriptions
    admin = await nats_operator.connect(admin_creds(nats_operator.keyring.account("shop")))
    info = await admin.jetstream().consumer_info(delivery.stream, delivery.consumer)
    assert info.config.max_deliver == 4
    # The app's time is ackWait; the backoff is the sidecar's (the delay of
    # its nak after a failure), never the server's: with a server-side
    # backoff the server would redeliver after its first step (0.1 s) an
    # event the app is still handling.
    assert info.config.ack_wait == 1.5
    assert not info.config.backoff
    assert info.config.filter_subject == EVENT
    assert info.config.durable_name == delivery.consumer
    assert getattr(info.config.ack_policy, "value", info.config.ack_policy) == "explicit"
    assert getattr(info.config.deliver_policy, "value", info.config.deliver_policy) == "new"
    assert (delivery.max_deliver, delivery.ack_wait_ms, delivery.backoff_ms) == (
        4,
        1500,
        (100, 2000),
    )
    for c in (admin, orders.nc, payments.nc):
        await c.close()


async def test_ack_wait_redelivers_an_unacked_event(nats_operator: OperatorNats) -> None:
    sub = Subscribe("order.created", "orders", "/e", max_deliver=3, ack_wait_ms=500)
    p, orders, payments = await setup(nats_operator, sub)
    (delivery,) = p.tables[("shop", "payments")].subscriptions
    await orders.nc.jetstream().publish(EVENT, b"slow")
    psub = await payments.nc.jetstream().pull_subscribe_bind(delivery.consumer, delivery.stream)
    (first,) = await psub.fetch(1, timeout=2)
    assert first.metadata.num_delivered == 1
    # Not acked: after ackWait the same event comes again.
    (second,) = await psub.fetch(1, timeout=3)
    assert second.data == b"slow"
    assert second.metadata.num_delivered == 2
    await second.ack_sync()
    await orders.close()
    await payments.close()


async def test_a_backoff_does_not_cut_the_apps_ack_wait(nats_operator: OperatorNats) -> None:
    """``ackWait: 3s, backoff: [100ms]``: an event still in the app's hands
    after 1 s is not redelivered (it was, after 100 ms, while the backoff was
    the server's); it comes again only after ackWait."""
    sub = Subscribe(
        "order.created", "orders", "/e", max_deliver=3, ack_wait_ms=3000, backoff_ms=(100,)
    )
    p, orders, payments = await setup(nats_operator, sub)
    (delivery,) = p.tables[("shop", "payments")].subscriptions
    await orders.nc.jetstream().publish(EVENT, b"slow")
    psub = await payments.nc.jetstream().pull_subscribe_bind(delivery.consumer, delivery.stream)
    (first,) = await psub.fetch(1, timeout=2)
    with pytest.raises(nats.errors.TimeoutError):
        await psub.fetch(1, timeout=1.5)
    (again,) = await psub.fetch(1, timeout=5)
    assert again.metadata.num_delivered == 2
    assert first.metadata.sequence.stream == again.metadata.sequence.stream
    await again.ack_sync()
    await orders.close()
    await payments.close()


async def test_dead_letter_after_max_deliver(nats_operator: OperatorNats) -> None:
    sub = Subscribe("order.created", "orders", "/e", max_deliver=3, ack_wait_ms=5000)
    p, orders, payments = await setup(nats_operator, sub)
    (delivery,) = p.tables[("shop", "payments")].subscriptions
    assert delivery.dead_letter_subject == subjects.dead_letter_subject(
        "shop", "payments", delivery.consumer
    )
    await orders.nc.jetstream().publish(EVENT, b'{"order": 1}', headers={"X-Request-Id": "r1"})
    js = payments.nc.jetstream()
    psub = await js.pull_subscribe_bind(delivery.consumer, delivery.stream)
    attempts = 0
    while True:
        (msg,) = await psub.fetch(1, timeout=2)
        attempts += 1
        assert msg.metadata.num_delivered == attempts
        if msg.metadata.num_delivered < delivery.max_deliver:
            await msg.nak()  # the app answered 500: try again
            continue
        # What the sidecar does on the last failed attempt:
        headers = dict(msg.headers or {})
        headers |= {
            "Natsmesh-Dead-Reason": "app returned 500",
            "Natsmesh-Source-Subject": msg.subject,
            "Natsmesh-Source-Sequence": str(msg.metadata.sequence.stream),
            "Natsmesh-Deliveries": str(msg.metadata.num_delivered),
        }
        ack = await js.publish(delivery.dead_letter_subject, msg.data, headers=headers)
        assert ack.stream == subjects.dead_letter_stream("payments")
        await msg.term()
        break
    assert attempts == 3
    with pytest.raises(nats.errors.TimeoutError):
        await psub.fetch(1, timeout=1)
    assert not payments.errors

    admin = await nats_operator.connect(admin_creds(nats_operator.keyring.account("shop")))
    dead = await admin.jetstream().get_last_msg(
        subjects.dead_letter_stream("payments"), delivery.dead_letter_subject
    )
    assert dead.data == b'{"order": 1}'
    assert dead.headers
    assert dead.headers["X-Request-Id"] == "r1"
    assert dead.headers["Natsmesh-Deliveries"] == "3"
    # inventory's consumer is independent and still has the event.
    info = await admin.jetstream().consumer_info(
        delivery.stream, subjects.consumer_name("inventory", "orders", "order.created")
    )
    assert info.num_pending == 1
    for c in (admin, orders.nc, payments.nc):
        await c.close()


async def test_server_stops_after_max_deliver_and_advises(nats_operator: OperatorNats) -> None:
    """The safety net when a sidecar dies before dead-lettering."""
    sub = Subscribe("order.created", "orders", "/e", max_deliver=2, ack_wait_ms=5000)
    p, orders, payments = await setup(nats_operator, sub)
    (delivery,) = p.tables[("shop", "payments")].subscriptions
    admin = await nats_operator.connect(admin_creds(nats_operator.keyring.account("shop")))
    advisories: asyncio.Queue[dict[str, object]] = asyncio.Queue()

    async def on_advisory(msg: Msg) -> None:
        await advisories.put(json.loads(msg.data))

    await admin.subscribe(
        f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{delivery.stream}.{delivery.consumer}",
        cb=on_advisory,
    )
    await admin.flush()
    await orders.nc.jetstream().publish(EVENT, b"poison")
    psub = await payments.nc.jetstream().pull_subscribe_bind(delivery.consumer, delivery.stream)
    for _ in range(2):
        (msg,) = await psub.fetch(1, timeout=2)
        await msg.nak()
    # A third pull finds nothing: the server gave up after maxDeliver...
    with pytest.raises(nats.errors.TimeoutError):
        await psub.fetch(1, timeout=1)
    # ...and said so, for the operator's metrics and a dead-letter sweeper.
    advisory = await asyncio.wait_for(advisories.get(), 3)
    assert advisory["deliveries"] == 2
    assert advisory["consumer"] == delivery.consumer
    for c in (admin, orders.nc, payments.nc):
        await c.close()


async def test_at_most_once_subscription_needs_no_acks(nats_operator: OperatorNats) -> None:
    sub = Subscribe("order.created", "orders", "/e", delivery="atMostOnce")
    p, orders, payments = await setup(nats_operator, sub)
    (delivery,) = p.tables[("shop", "payments")].subscriptions
    assert delivery.max_deliver == 1
    perms = p.user("shop", "payments").permissions
    assert not any(s.startswith("$JS.ACK") for s in perms.pub_allow)
    await orders.nc.jetstream().publish(EVENT, b"fire and forget")
    psub = await payments.nc.jetstream().pull_subscribe_bind(delivery.consumer, delivery.stream)
    (msg,) = await psub.fetch(1, timeout=2)
    assert msg.data == b"fire and forget"
    await orders.close()
    await payments.close()
