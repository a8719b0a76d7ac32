"""A service's own creds, spoken to NATS directly, reach nothing beyond its grant.

The tenant ``t`` runs ``a`` (default policy: admits its namespace, so it may
call itself), ``b`` (admits only ``x``), ``x`` (b's one caller) and ``c``
(publishes ``c.done`` and has a route table). The attacker holds ``a``'s creds,
or ``c``'s, as any pod of the namespace that mounts the Secret could. Users,
accounts, streams and tables are the operator's own code's, on a real
operator-mode nats-server; callees are real sidecars where it matters.

Each attack sits beside the legitimate call that must keep working.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from natsmesh_operator.wiring.apply import admin_creds
from natsmesh_operator.wiring.desired import CallerRef, Publish, ServiceIntent, Subscribe
from natsmesh_operator.wiring.plan import MeshPlan
from natsmesh_sidecar import subjects
from natsmesh_sidecar.app import Sidecar
from tests.fixtures.nats_operator import OperatorNats, Probe, call, request_served, serve_as
from tests.integration.sidecar.sidecar_harness import TestApp, request, settings

NS = "t"


def tenant() -> list[ServiceIntent]:
    return [
        ServiceIntent(NS, "a"),
        ServiceIntent(NS, "b", allow_same_namespace=False, allowed_callers=(CallerRef("x"),)),
        ServiceIntent(NS, "x"),
        ServiceIntent(
            NS,
            "c",
            publishes=(Publish("c.done"),),
            # c reads its own topic too: a consumer it may pull from.
            subscriptions=(Subscribe("c.done", "c", "/self"),),
        ),
    ]


@dataclass
class Tenant:
    on: OperatorNats
    plan: MeshPlan
    creds: dict[str, str]

    async def probe(self, service: str) -> Probe:
        return await Probe.connect(self.on, self.creds[service], service)

    async def admin(self) -> NATS:
        return await self.on.connect(admin_creds(self.on.keyring.account(NS)))


@pytest.fixture
async def t(nats_operator: OperatorNats) -> Tenant:
    p, creds = await nats_operator.apply_tenant(tenant(), NS)
    return Tenant(nats_operator, p, creds)


async def stream_names(t: Tenant) -> set[str]:
    nc = await t.admin()
    try:
        return {str(s.config.name) for s in await nc.jetstream().streams_info()}
    finally:
        await nc.close()


async def table_value(t: Tenant, service: str) -> bytes:
    nc = await t.admin()
    try:
        last = await nc.jetstream().get_last_msg(
            subjects.routes_stream(), subjects.routes_key_subject(service)
        )
        return bytes(last.data or b"")
    finally:
        await nc.close()


async def test_answering_yourself_cannot_publish_to_the_reply_you_chose(t: Tenant) -> None:
    """Attack 1 of issue 11: with a response permission, a service that can
    call itself published once anywhere in its account by choosing the reply."""
    attacker = await t.probe("a")
    b_heard: list[str] = []
    b = await t.probe("b")

    async def hear(msg: Msg) -> None:
        b_heard.append(msg.subject)

    await serve_as(b.nc, t.plan, NS, "b", hear)
    answered: list[str] = []

    async def answer(msg: Msg) -> None:
        answered.append(msg.reply)
        await msg.respond(b"{}")

    await serve_as(attacker.nc, t.plan, NS, "a", answer)
    targets = [
        f"$JS.API.STREAM.DELETE.{subjects.stream_name('c')}",
        call(NS, "b", NS, "x"),
        subjects.routes_key_subject("c"),
    ]
    before = await table_value(t, "c")
    try:
        for target in targets:
            await attacker.nc.publish(call(NS, "a", NS, "a"), b"{}", reply=target)
            await attacker.nc.flush()
            await attacker.violation("publish", target)
        assert sorted(answered) == sorted(targets)
        # Nothing happened anywhere:
        assert subjects.stream_name("c") in await stream_names(t)
        assert b_heard == []
        assert await table_value(t, "c") == before
        # ...while a's legitimate call to itself, replied into its own inbox, works.
        reply = await attacker.nc.request(call(NS, "a", NS, "a"), b"hi", timeout=2)
        assert reply.data == b"{}"
    finally:
        await attacker.close()
        await b.close()


async def test_a_callee_cannot_answer_outside_its_callers_inboxes(t: Tenant) -> None:
    """b admits only x: it may reply into x's inbox and nowhere else."""
    b = await t.probe("b")
    x = await t.probe("x")

    async def answer(msg: Msg) -> None:
        await msg.respond(b"from b")

    await serve_as(b.nc, t.plan, NS, "b", answer)
    try:
        assert (await request_served(x.nc, call(NS, "b", NS, "x"))).data == b"from b"
        for elsewhere in (f"{subjects.inbox_prefix('a')}.zzz", "_INBOX.zzz", "mesh.t.a.v1.t.x"):
            await b.nc.publish(elsewhere, b"forged answer")
            await b.nc.flush()
            await b.violation("publish", elsewhere)
    finally:
        await b.close()
        await x.close()


@pytest.fixture
async def b_sidecar(t: Tenant, tmp_path: Path) -> AsyncIterator[tuple[Sidecar, TestApp]]:
    """b's real sidecar (creds from its Secret's content) in front of an app."""
    app = await TestApp().start()
    creds = tmp_path / "b.creds"
    creds.write_text(t.creds["b"])
    sidecar = Sidecar(settings("b", NS, t.on.url, app.port, creds_file=str(creds)))
    await sidecar.start()
    await sidecar.wait_ready()
    try:
        yield sidecar, app
    finally:
        await sidecar.stop()
        await app.stop()


async def test_jetstream_replies_cannot_impersonate_a_caller(
    t: Tenant, b_sidecar: tuple[Sidecar, TestApp]
) -> None:
    """c may publish events and pull its consumer: JetStream then publishes, on
    c's behalf, to the reply subjects c chose. Aimed at b as if from x, the
    pulled message even carries c's own headers and body. b's sidecar refuses
    both (the reply is not x's inbox); x's real call still works."""
    sidecar, app = b_sidecar
    as_x = call(NS, "b", NS, "x")
    attacker = await t.probe("c")
    js = attacker.nc.jetstream()
    forged = {"Nm-Method": "POST", "Nm-Target": "/transfer", "Nm-Source": "x.t"}
    try:
        # 1. the publish ack of an event, sent to b "from x"
        await attacker.nc.publish(
            subjects.event_subject(NS, "c", "c.done"), b"{}", reply=as_x, headers=forged
        )
        # 2. a stored message (with the attacker's headers) pulled to b "from x"
        consumer = subjects.consumer_name("c", "c", "c.done")
        await attacker.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{subjects.stream_name('c')}.{consumer}",
            b'{"batch": 1}',
            reply=as_x,
        )
        await attacker.nc.flush()
        await asyncio.sleep(0.5)
        assert [r.path for r in app.requests] == []
        refused = sidecar.metrics.registry.get_sample_value(
            "natsmesh_sidecar_nats_async_errors_total", {"kind": "request_refused"}
        )
        assert refused is not None
        assert refused >= 2
        del js
        # The legitimate caller, through its own sidecar:
        x_creds = Path(str(sidecar.settings.creds_file)).with_name("x.creds")
        x_creds.write_text(t.creds["x"])
        x = Sidecar(settings("x", NS, t.on.url, creds_file=str(x_creds)))
        await x.start()
        try:
            await x.wait_ready()
            x.apply_table(t.plan.tables[(NS, "x")])
            r = await request(x.outbound_port, "POST", "/transfer", host="b", body=b"ok")
            assert r.status == 200, r.body
            assert [q.path for q in app.requests] == ["/transfer"]
        finally:
            await x.stop()
    finally:
        await attacker.close()


async def test_a_planted_route_table_is_ignored_and_repaired(
    t: Tenant, b_sidecar: tuple[Sidecar, TestApp]
) -> None:
    """c has JetStream deliver, to ``$KV.natsmesh-routes.b``, its own signed
    table (a direct get) and a publish ack: the bucket stores both as b's
    table. b's sidecar applies neither (signed for another key, or not at all)
    and the operator's next apply puts b's own back."""
    sidecar, _ = b_sidecar
    genuine = t.plan.tables[(NS, "b")]
    for _ in range(200):  # the sidecar reads its signed table at start
        if sidecar.router.table.generation == genuine.generation:
            break
        await asyncio.sleep(0.02)
    assert sidecar.router.table.generation == genuine.generation
    attacker = await t.probe("c")
    own_key = f"$JS.API.DIRECT.GET.{subjects.routes_stream()}.{subjects.routes_key_subject('c')}"
    planted = [
        # c's own table, with its signature header (valid for key "c" only)
        (own_key, b"", b'"service":"c"'),
        # the ack of c's event: {"stream":"EVENTS_c","seq":...}, unsigned
        (subjects.event_subject(NS, "c", "c.done"), b"{}", b'"stream"'),
    ]
    try:
        for subject, body, landed in planted:
            await attacker.nc.publish(subject, body, reply=subjects.routes_key_subject("b"))
            await attacker.nc.flush()
            await asyncio.sleep(0.3)
            assert landed in await table_value(t, "b"), "the bucket took it"
            assert sidecar.router.table.generation == genuine.generation, "the sidecar did not"
            assert not attacker.errors
    finally:
        await attacker.close()
    # A sidecar that starts now reads the planted value and refuses it too.
    assert sidecar.kv_watch is not None
    await sidecar.kv_watch.refresh(sidecar.nc)
    assert sidecar.router.table.generation == genuine.generation
    async with t.on.applier() as a:
        report = await a.apply(t.plan)
    assert f"{NS}/b" in report.kv_put
    assert json.loads(await table_value(t, "b"))["generation"] == genuine.generation
