"""An exactlyOnce subscriber's completed-key record is its own.

payments subscribes to orders' ``order.created`` exactlyOnce; its real
sidecar (operator-issued creds, table from the signed KV) hands an event to
its app and writes the event's key to the namespace's ``natsmesh-done``
bucket. inventory -- another exactlyOnce subscriber of the same namespace,
with a record of its own -- speaking NATS directly with its creds cannot read
payments' key (direct get, stream message get, a subscription on the
bucket's subjects) nor write one (a put that would make payments' sidecar
skip an event it never handed over). JetStream, answering a direct get of
inventory's own route key to a reply subject inventory chose, does store
bytes under one of payments' keys: the sidecar ignores them (the value is an
HMAC under payments' creds) and the event is delivered. Its own record
inventory may use.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import nats
import pytest

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.apply import admin_creds
from natsmesh_operator.wiring.desired import Subscribe
from natsmesh_operator.wiring.plan import plan
from natsmesh_sidecar import subjects
from natsmesh_sidecar.app import Sidecar
from natsmesh_sidecar.events.completed import key_token
from tests.fixtures.nats_operator import OperatorNats, Probe, shop_intents
from tests.integration.sidecar.sidecar_harness import TestApp, settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

EVENT = subjects.event_subject("shop", "orders", "order.created")


def exactly_once_shop() -> list[object]:
    sub = Subscribe("order.created", "orders", "/events/order-created", delivery="exactlyOnce")
    return [
        replace(i, subscriptions=(sub,)) if i.name in ("payments", "inventory") else i
        for i in shop_intents()
    ]


async def test_another_service_cannot_read_or_write_a_subscribers_completed_keys(
    nats_operator: OperatorNats, tmp_path: Path
) -> None:
    p = plan(exactly_once_shop())  # type: ignore[arg-type]
    assert not p.problems
    async with nats_operator.applier() as a:
        report = await a.apply(p)
    assert report.ok, report.errors
    assert f"shop/{subjects.done_stream()}" in report.streams_created
    account = nats_operator.keyring.account("shop")
    (mine,) = p.tables[("shop", "payments")].subscriptions
    (theirs,) = p.tables[("shop", "inventory")].subscriptions
    scope = subjects.done_scope("shop", mine.consumer)
    own_scope = subjects.done_scope("shop", theirs.consumer)
    token = key_token("order-1")

    app = await TestApp().start()
    creds = tmp_path / "payments.creds"
    creds.write_text(users.issue(p.user("shop", "payments"), account).creds)
    sidecar = Sidecar(
        settings("payments", "shop", nats_operator.url, app.port, creds_file=str(creds))
    )
    orders = await Probe.connect(
        nats_operator, users.issue(p.user("shop", "orders"), account).creds, "orders"
    )
    attacker = await Probe.connect(
        nats_operator, users.issue(p.user("shop", "inventory"), account).creds, "inventory"
    )
    admin = await nats_operator.connect(admin_creds(account))
    try:
        await sidecar.start()
        await sidecar.wait_ready()
        # The legitimate sidecar: delivers, writes the key, looks it up.
        await orders.nc.jetstream().publish(EVENT, b"{}", headers={"Nats-Msg-Id": "order-1"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not app.requests:
            assert loop.time() < deadline, "payments' app got no event"
            await asyncio.sleep(0.05)
        key_subject = subjects.done_key_subject(scope, token)
        deadline = loop.time() + 10
        while True:
            try:
                written = await admin.jetstream().get_last_msg(subjects.done_stream(), key_subject)
                break
            except Exception:
                assert loop.time() < deadline, "payments' sidecar wrote no completed key"
                await asyncio.sleep(0.05)
        unavailable = sidecar.metrics.events_dedup_unavailable
        assert unavailable.labels("order.created", "lookup").get() == 0
        assert unavailable.labels("order.created", "record").get() == 0
        assert [r.header("idempotency-key") for r in app.requests] == ["order-1"]

        # Another service, directly: no read ...
        nc = attacker.nc
        # A denied request is dropped by the server: the requester only times out.
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(subjects.done_direct_get(scope, token), b"", timeout=1)
        await attacker.violation("publish", subjects.done_direct_get(scope, token))
        get = f"{subjects.JS_API_PREFIX}.STREAM.MSG.GET.{subjects.done_stream()}"
        body = json.dumps({"last_by_subj": key_subject}).encode()
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(get, body, timeout=1)
        await attacker.violation("publish", get)
        await nc.subscribe(f"$KV.{subjects.DONE_BUCKET}.>")
        await nc.flush()
        await attacker.violation("subscription", f"$KV.{subjects.DONE_BUCKET}.>")
        # ... and no write: a forged "completed" for an event not yet delivered.
        forged = subjects.done_key_subject(scope, key_token("order-2"))
        await nc.publish(forged, b"")
        await nc.flush()
        await attacker.violation("publish", forged)
        await nc.publish(key_subject, b"overwritten")
        await nc.flush()
        await attacker.violation("publish", key_subject)
        last = await admin.jetstream().get_last_msg(subjects.done_stream(), key_subject)
        assert last.seq == written.seq
        info = await admin.jetstream().stream_info(subjects.done_stream())
        assert info.state.messages == 1  # nothing but payments' own key

        # JetStream as a proxy: it answers inventory's own direct get into
        # payments' record, and the bucket stores the answer ...
        own_route = subjects.routes_key_subject("inventory")
        direct = f"{subjects.JS_API_PREFIX}.DIRECT.GET.{subjects.routes_stream()}.{own_route}"
        await nc.publish(direct, b"", reply=forged)
        await nc.flush()
        deadline = loop.time() + 5
        while True:
            try:
                await admin.jetstream().get_last_msg(subjects.done_stream(), forged)
                break
            except Exception:
                assert loop.time() < deadline, "the proxy write did not land (test premise)"
                await asyncio.sleep(0.05)
        # ... which payments' sidecar does not take for its own: order-2 arrives.
        await orders.nc.jetstream().publish(EVENT, b"{}", headers={"Nats-Msg-Id": "order-2"})
        deadline = loop.time() + 15
        while len(app.requests) < 2:
            assert loop.time() < deadline, "the planted key made payments skip order-2"
            await asyncio.sleep(0.05)
        assert [r.header("idempotency-key") for r in app.requests] == ["order-1", "order-2"]

        # Control: the same connection may use its own record.
        own = await nc.request(subjects.done_direct_get(own_scope, token), b"", timeout=2)
        assert (own.headers or {}).get("Status") == "404"
        ack = await nc.jetstream().publish(subjects.done_key_subject(own_scope, token), b"")
        assert ack.stream == subjects.done_stream()
    finally:
        await sidecar.stop()
        await app.stop()
        await orders.close()
        await attacker.close()
        await admin.close()
