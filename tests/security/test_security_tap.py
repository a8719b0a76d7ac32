"""Tapping: a service's creds cannot read or start taps, the tap creds cannot call.

The namespace ``t`` runs ``a`` and ``b`` (default policy: each admits the
namespace). The attacker holds ``a``'s creds (any pod of the namespace that
mounts its Secret), or the namespace's tap creds (whoever may read Secret
``natsmesh-tap``), and speaks NATS directly. Users, accounts and permissions
are the operator's own code's on a real operator-mode nats-server; ``b`` is
a real sidecar in front of an app. Each attack sits beside the legitimate
call that must keep working.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.desired import Publish, ServiceIntent, Subscribe
from natsmesh_operator.wiring.plan import MeshPlan, plan
from natsmesh_sidecar import subjects
from natsmesh_sidecar.app import Sidecar
from tests.fixtures.nats_operator import OperatorNats, Probe, call
from tests.integration.sidecar.sidecar_harness import TestApp, settings

NS = "t"
START = json.dumps({"session": "s1", "ttl": 10}).encode()


@dataclass
class Tapped:
    on: OperatorNats
    plan: MeshPlan
    creds: dict[str, str]
    """By service, and ``tap`` for the namespace's tap user."""
    sidecar: Sidecar
    app: TestApp

    async def probe(self, who: str) -> Probe:
        return await Probe.connect(self.on, self.creds[who], who)


@pytest.fixture
async def tapped(nats_operator: OperatorNats, tmp_path: Path) -> AsyncIterator[Tapped]:
    intents = [
        # a stores what it likes in its stream and may pull it (a consumer of its own)
        ServiceIntent(
            NS,
            "a",
            publishes=(Publish("a.done"),),
            subscriptions=(Subscribe("a.done", "a", "/self"),),
        ),
        ServiceIntent(NS, "b", publishes=(Publish("b.done"),)),
    ]
    p = plan(intents)
    assert not p.problems, p.problems
    async with nats_operator.applier() as applier:
        assert (await applier.apply(p)).ok
    account = nats_operator.keyring.account(NS)
    creds = {i.name: users.issue(p.user(NS, i.name), account).creds for i in intents}
    creds["tap"] = users.issue(p.tap_users[0], account).creds
    app = await TestApp().start()
    (tmp_path / "b.creds").write_text(creds["b"])
    sidecar = Sidecar(
        settings("b", NS, nats_operator.url, app.port, creds_file=str(tmp_path / "b.creds"))
    )
    await sidecar.start()
    try:
        await sidecar.wait_ready()
        yield Tapped(nats_operator, p, creds, sidecar, app)
    finally:
        await sidecar.stop()
        await app.stop()


async def eventually(check: Callable[[], object]) -> None:
    for _ in range(100):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not within 2 s")


async def start_tap(tapped: Tapped, tap: Probe) -> list[Msg]:
    """The tap user starts session ``s1`` of b: what b's sidecar sends it."""
    records = await heard(tap, subjects.tap_records(NS, "b", "s1"))
    await tap.nc.publish(subjects.tap_control(NS, "b"), START)
    await tap.nc.flush()
    await eventually(lambda: records)
    assert tapped.sidecar.tap is not None
    return records


async def heard(subject_of: Probe, subject: str) -> list[Msg]:
    got: list[Msg] = []

    async def keep(msg: Msg) -> None:
        got.append(msg)

    await subject_of.nc.subscribe(subject, cb=keep)
    await subject_of.nc.flush()
    return got


async def test_service_creds_cannot_start_a_tap_the_tap_creds_can(tapped: Tapped) -> None:
    attacker = await tapped.probe("a")
    tap = await tapped.probe("tap")
    ctl = subjects.tap_control(NS, "b")
    try:
        await attacker.nc.publish(ctl, START)
        await attacker.nc.flush()
        await attacker.violation("publish", ctl)
        await asyncio.sleep(0.2)
        assert tapped.sidecar.tap is None  # b's sidecar heard nothing
        # The tap user starts it; b's sidecar answers into the session.
        records = await start_tap(tapped, tap)
        assert json.loads(records[0].data)["kind"] == "status"
    finally:
        await attacker.close()
        await tap.close()


async def test_service_creds_cannot_read_another_services_tap_records(tapped: Tapped) -> None:
    attacker = await tapped.probe("a")
    tap = await tapped.probe("tap")
    try:
        for target in (
            subjects.tap_records(NS, "b"),
            subjects.tap_records(NS, "a", "s1"),
            "natsmesh.tap.>",
        ):
            await attacker.nc.subscribe(target)
            await attacker.nc.flush()
            await attacker.violation("subscription", target)
        # Beside it the tap user reads b's records of a real call.
        records = await start_tap(tapped, tap)
        # a's call, sent with a's creds as its sidecar sends it:
        reply = await attacker.nc.request(
            call(NS, "b", NS, "a"),
            b"",
            headers={"Nm-Method": "GET", "Nm-Target": "/orders?card=4111"},
            timeout=3,
        )
        assert reply.headers is not None
        assert reply.headers.get("Nm-Status") == "200"
        await eventually(lambda: len(records) == 2)
        (rec,) = [json.loads(m.data) for m in records if json.loads(m.data)["kind"] == "request"]
        assert (rec["direction"], rec["source"], rec["path"]) == ("inbound", f"a.{NS}", "/orders")
    finally:
        await attacker.close()
        await tap.close()


async def test_tap_creds_cannot_call_publish_or_listen_elsewhere(tapped: Tapped) -> None:
    tap = await tapped.probe("tap")
    a = await tapped.probe("a")
    try:
        for target in (
            call(NS, "b", NS, "a"),  # as a
            "mesh.t.b.v1.t.natsmesh-tap",  # as itself
            subjects.event_subject(NS, "b", "b.done"),
            subjects.tap_control("u", "b"),  # another namespace's
            "$JS.API.STREAM.LIST",
        ):
            await tap.nc.publish(target, b"{}", headers={"Nm-Method": "GET", "Nm-Target": "/"})
            await tap.nc.flush()
            await tap.violation("publish", target)
        for target in ("mesh.>", "_INBOX.>", subjects.routes_key_subject("b")):
            await tap.nc.subscribe(target)
            await tap.nc.flush()
            await tap.violation("subscription", target)
        await asyncio.sleep(0.2)
        assert tapped.app.requests == []
        # ...while a's legitimate call reaches b's app.
        reply = await a.nc.request(
            call(NS, "b", NS, "a"), b"", headers={"Nm-Method": "GET", "Nm-Target": "/"}, timeout=3
        )
        assert reply.headers is not None
        assert reply.headers.get("Nm-Status") == "200"
        assert [r.path for r in tapped.app.requests] == ["/"]
    finally:
        await tap.close()
        await a.close()


async def test_an_outside_session_name_cannot_escape_the_records_subject(tapped: Tapped) -> None:
    """The session becomes a subject token: one that is not a plain token is ignored."""
    tap = await tapped.probe("tap")
    try:
        for bad in ("x.y", "*", ">", "a b"):
            await tap.nc.publish(
                subjects.tap_control(NS, "b"), json.dumps({"session": bad, "ttl": 10}).encode()
            )
        await tap.nc.flush()
        await asyncio.sleep(0.2)
        assert tapped.sidecar.tap is None
        # A plain token starts it.
        await start_tap(tapped, tap)
        assert list(tapped.sidecar._tapper.sessions) == ["s1"]
    finally:
        await tap.close()


async def test_jetstream_cannot_start_a_tap_for_a_service(tapped: Tapped) -> None:
    """JetStream publishes, on a's behalf, to the reply subject a chose: a stores
    a control message as an event, then pulls it with b's control subject as the
    reply. The delivery reaches b's sidecar with a's body, and a ``$JS.ACK``
    reply; the CLI's control messages carry no reply and no headers, so b
    ignores anything that does."""
    attacker = await tapped.probe("a")
    ctl = subjects.tap_control(NS, "b")
    consumer = subjects.consumer_name("a", "a", "a.done")
    try:
        await attacker.nc.publish(subjects.event_subject(NS, "a", "a.done"), START, reply=ctl)
        await attacker.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{subjects.stream_name('a')}.{consumer}",
            b'{"batch": 1}',
            reply=ctl,
        )
        await attacker.nc.flush()
        await asyncio.sleep(0.5)
        assert tapped.sidecar.tap is None
    finally:
        await attacker.close()
