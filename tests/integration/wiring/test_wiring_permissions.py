"""The shop's permission matrix, enforced by a real operator-mode nats-server.

Every (caller, target) request pair, subscriptions to other services'
subjects, publishing other services' events, reading other services'
consumers, route-table keys and inboxes. Allowed cases must work end to end;
refused ones must produce the server's own 'Permissions Violation' (not just
a timeout).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.apply import admin_creds
from natsmesh_operator.wiring.plan import MeshPlan, plan
from natsmesh_sidecar import subjects
from tests.fixtures.nats_operator import OperatorNats, Probe, shop_intents, start_operator_nats

pytestmark = pytest.mark.integration

NS = "shop"
SERVICES = ("gateway", "orders", "payments", "inventory")
ALLOWED_CALLS = {("gateway", "orders"), ("orders", "payments")}


@dataclass
class Shop:
    on: OperatorNats
    plan: MeshPlan
    creds: dict[str, str]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    on = start_operator_nats(Path(tmp_path_factory.mktemp("perm")))
    p = plan(shop_intents(NS))
    assert not p.problems

    async def setup() -> None:
        async with on.applier() as a:
            report = await a.apply(p)
            assert report.ok, report.errors

    asyncio.run(setup())
    account = on.keyring.account(NS)
    creds = {s: users.issue(p.user(NS, s), account).creds for s in SERVICES}
    try:
        yield Shop(on, p, creds)
    finally:
        on.server.stop()


async def probe(shop: Shop, service: str) -> Probe:
    return await Probe.connect(shop.on, shop.creds[service], service)


def call(target: str, caller: str) -> str:
    return subjects.call_subject(subjects.request_subject(NS, target), NS, caller)


def serving(shop: Shop, service: str) -> list[tuple[str, str]]:
    """The request subscriptions a service's JWT allows (as its sidecar makes them)."""
    sub = shop.plan.user(NS, service).permissions.sub_allow
    return subjects.serve_subjects(sub, subjects.request_subject(NS, service))


async def serve(shop: Shop, service: str) -> Probe:
    """The target's sidecar: answers on its own subjects with its queue group."""
    p = await probe(shop, service)

    async def reply(msg: Msg) -> None:
        await msg.respond(f"{service} ok".encode())

    for subject, queue in serving(shop, service):
        await p.nc.subscribe(subject, queue=queue, cb=reply)
    await p.nc.flush()
    return p


@pytest.mark.parametrize("caller", SERVICES)
@pytest.mark.parametrize("target", SERVICES)
async def test_request_matrix(shop: Shop, caller: str, target: str) -> None:
    server = await serve(shop, target)
    client = await probe(shop, caller)
    subject = call(target, caller)
    try:
        if (caller, target) in ALLOWED_CALLS:
            reply = await client.nc.request(subject, b"hi", timeout=2)
            assert reply.data == f"{target} ok".encode()
            assert not client.errors
        else:
            # The caller may say who it is; the target does not listen to it.
            with pytest.raises(nats.errors.NoRespondersError):
                await client.nc.request(subject, b"hi", timeout=2)
            assert not client.errors
        # Naming another caller (one the target does admit) is the server's refusal.
        for other in SERVICES:
            if other != caller:
                forged = call(target, other)
                await client.nc.publish(forged, b"hi", reply=client.nc.new_inbox())
                await client.nc.flush()
                await client.violation("publish", forged)
        assert not server.errors
    finally:
        await client.close()
        await server.close()


@pytest.mark.parametrize(
    ("service", "other"), [(s, o) for s in SERVICES for o in SERVICES if s != o]
)
async def test_cannot_subscribe_to_another_services_subject(
    shop: Shop, service: str, other: str
) -> None:
    p = await probe(shop, service)
    subject = subjects.serve_subject(NS, other, "v1", NS, service)
    try:
        await p.nc.subscribe(subject, queue=subjects.queue_group(other))
        await p.nc.flush()
        await p.violation("subscription", subject)
    finally:
        await p.close()


@pytest.mark.parametrize("service", ["orders", "payments"])
async def test_own_subject_only_with_its_queue_group(shop: Shop, service: str) -> None:
    """Without the queue group a second process could not share the load fairly."""
    p = await probe(shop, service)
    ((subject, _),) = serving(shop, service)
    try:
        await p.nc.subscribe(subject)
        await p.nc.flush()
        await p.violation("subscription", subject)
    finally:
        await p.close()


@pytest.mark.parametrize("service", ["gateway", "inventory"])
async def test_a_service_admitting_nobody_hears_nothing(shop: Shop, service: str) -> None:
    assert serving(shop, service) == []
    p = await probe(shop, service)
    subject = subjects.serve_subject(NS, service, "v1", NS, "*")
    try:
        await p.nc.subscribe(subject, queue=service)
        await p.nc.flush()
        await p.violation("subscription", subject)
    finally:
        await p.close()


@pytest.mark.parametrize("service", SERVICES)
async def test_only_the_owner_publishes_its_event_topic(shop: Shop, service: str) -> None:
    subject = subjects.event_subject(NS, "orders", "order.created")
    p = await probe(shop, service)
    try:
        js = p.nc.jetstream()
        if service == "orders":
            ack = await js.publish(subject, b'{"id": 1}')
            assert ack.stream == subjects.stream_name("orders")
        else:
            await p.nc.publish(subject, b'{"id": 666}')
            await p.nc.flush()
            await p.violation("publish", subject)
    finally:
        await p.close()


@pytest.mark.parametrize("service", SERVICES)
async def test_cannot_publish_events_of_its_own_name_it_does_not_declare(
    shop: Shop, service: str
) -> None:
    subject = subjects.event_subject(NS, service, "undeclared.topic")
    p = await probe(shop, service)
    try:
        await p.nc.publish(subject, b"x")
        await p.nc.flush()
        await p.violation("publish", subject)
    finally:
        await p.close()


CONSUMERS = {
    "payments": subjects.consumer_name("payments", "orders", "order.created"),
    "inventory": subjects.consumer_name("inventory", "orders", "order.created"),
}


@pytest.mark.parametrize("reader", SERVICES)
@pytest.mark.parametrize("owner", sorted(CONSUMERS))
async def test_consumer_read_matrix(shop: Shop, reader: str, owner: str) -> None:
    stream = subjects.stream_name("orders")
    consumer = CONSUMERS[owner]
    p = await probe(shop, reader)
    try:
        js = p.nc.jetstream()
        if reader == owner:
            pub = await probe(shop, "orders")
            await pub.nc.jetstream().publish(
                subjects.event_subject(NS, "orders", "order.created"), b"for " + owner.encode()
            )
            await pub.close()
            sub = await js.pull_subscribe_bind(consumer, stream)
            msgs = await sub.fetch(1, timeout=2)
            assert msgs
            await msgs[0].ack_sync()
            assert not p.errors
        else:
            next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
            await p.nc.publish(next_subject, b'{"batch":1}')
            await p.nc.flush()
            await p.violation("publish", next_subject)
            ack = f"$JS.ACK.{stream}.{consumer}.1.1.1.0.0"
            await p.nc.publish(ack, b"+ACK")
            await p.nc.flush()
            await p.violation("publish", ack)
    finally:
        await p.close()


@pytest.mark.parametrize("reader", SERVICES)
@pytest.mark.parametrize("owner", ["orders", "payments"])
async def test_route_table_key_matrix(shop: Shop, reader: str, owner: str) -> None:
    p = await probe(shop, reader)
    stream, key = subjects.routes_stream(), subjects.routes_key_subject(owner)
    direct = f"$JS.API.DIRECT.GET.{stream}.{key}"
    try:
        if reader == owner:
            entry = await p.nc.request(direct, b"", timeout=2)
            table = json.loads(entry.data or b"{}")
            assert table["service"] == owner
            assert table["generation"] == shop.plan.tables[(NS, owner)].generation
        else:
            with pytest.raises(nats.errors.TimeoutError):
                await p.nc.request(direct, b"", timeout=0.5)
            await p.violation("publish", direct)
            await p.nc.subscribe(key)
            await p.nc.flush()
            await p.violation("subscription", key)
    finally:
        await p.close()


@pytest.mark.parametrize(
    "subject",
    [
        f"$JS.API.CONSUMER.CREATE.{subjects.routes_stream()}",
        # even filtered on its own key: a push consumer's deliver subject is a
        # subject the server would publish to on the creator's behalf
        f"$JS.API.CONSUMER.CREATE.{subjects.routes_stream()}.x.$KV.natsmesh-routes.payments",
        f"$JS.API.STREAM.INFO.{subjects.routes_stream()}",
    ],
)
async def test_no_consumer_creation_or_bucket_info(shop: Shop, subject: str) -> None:
    p = await probe(shop, "payments")
    try:
        await p.nc.publish(subject, b"{}")
        await p.nc.flush()
        await p.violation("publish", subject)
    finally:
        await p.close()


async def test_own_route_table_watch_gets_updates(shop: Shop) -> None:
    """The sidecar's cheap watch: a plain subscription on its own key's subject."""
    p = await probe(shop, "payments")
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        await got.put(msg.data)

    try:
        await p.nc.subscribe(subjects.routes_key_subject("payments"), cb=on_msg)
        await p.nc.flush()
        # Putting is the operator's job: do it as the account's admin user.
        nc = await shop.on.connect(admin_creds(shop.on.keyring.account(NS)))
        kv = await nc.jetstream().key_value(subjects.ROUTES_BUCKET)
        await kv.put("payments", shop.plan.tables[(NS, "payments")].to_json())
        await nc.close()
        data = await asyncio.wait_for(got.get(), 2)
        assert json.loads(data)["service"] == "payments"
    finally:
        await p.close()


@pytest.mark.parametrize("snooper", ["gateway", "payments", "inventory"])
async def test_cannot_read_another_services_inbox(shop: Shop, snooper: str) -> None:
    p = await probe(shop, snooper)
    subject = f"{subjects.inbox_prefix('orders')}.>"
    try:
        await p.nc.subscribe(subject)
        await p.nc.flush()
        await p.violation("subscription", subject)
    finally:
        await p.close()
