"""After a nats-server restart on the same store everything is still there."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.apply import admin_creds
from natsmesh_operator.wiring.plan import plan
from natsmesh_sidecar import subjects
from natsmesh_sidecar.config import MeshTable
from tests.fixtures.nats_operator import (
    OperatorNats,
    Probe,
    call,
    request_served,
    serve_as,
    shop_intents,
)

pytestmark = pytest.mark.integration


async def test_restart_keeps_accounts_streams_consumers_and_tables(
    nats_operator: OperatorNats,
) -> None:
    p = plan(shop_intents())
    async with nats_operator.applier() as a:
        assert (await a.apply(p)).ok
    orders_creds = users.issue(p.user("shop", "orders"), nats_operator.keyring.account("shop"))
    payments_creds = users.issue(p.user("shop", "payments"), nats_operator.keyring.account("shop"))
    orders = await Probe.connect(nats_operator, orders_creds.creds, "orders")
    await orders.nc.jetstream().publish(
        subjects.event_subject("shop", "orders", "order.created"), b"before restart"
    )
    await orders.close()

    nats_operator.restart()

    async with nats_operator.applier() as a:
        assert nats_operator.keyring.account("shop").public in await a.list_accounts()
        again = await a.apply(p)
    assert again.ok, again.errors
    assert again.changes == {}, "the restarted server lost something"

    admin = await nats_operator.connect(admin_creds(nats_operator.keyring.account("shop")))
    js = admin.jetstream()
    info = await js.stream_info(subjects.stream_name("orders"))
    assert info.state.messages == 1
    consumers = {c.name for c in await js.consumers_info(subjects.stream_name("orders"))}
    assert consumers == {
        subjects.consumer_name("payments", "orders", "order.created"),
        subjects.consumer_name("inventory", "orders", "order.created"),
    }
    kv = await js.key_value(subjects.ROUTES_BUCKET)
    table = MeshTable.from_json((await kv.get("orders")).value or b"")
    assert table == p.tables[("shop", "orders")]
    await admin.close()

    # The sidecar users issued before the restart still connect and work.
    payments = await Probe.connect(nats_operator, payments_creds.creds, "payments")

    async def reply(msg: Msg) -> None:
        await msg.respond(b"paid")

    await serve_as(payments.nc, p, "shop", "payments", reply)
    orders = await Probe.connect(nats_operator, orders_creds.creds, "orders")
    assert (await request_served(orders.nc, call("shop", "payments", "shop", "orders"))).data == (
        b"paid"
    )
    sub = await payments.nc.jetstream().pull_subscribe_bind(
        subjects.consumer_name("payments", "orders", "order.created"),
        subjects.stream_name("orders"),
    )
    (msg,) = await sub.fetch(1, timeout=2)
    assert msg.data == b"before restart"
    await msg.ack()
    await orders.close()
    await payments.close()
