"""A streamed call's chunks are the caller's and the callee's alone.

The tenant ``t`` runs ``web`` (the caller), ``orders`` (admits only web) and
``evil``, whose creds the attacker holds, as any pod of the namespace that
mounts its Secret could. Users and accounts are the operator's own code's, on
a real operator-mode nats-server; web and orders are real sidecars (their
creds as the operator issued them) in front of an aiohttp app.

While web uploads a body of several chunks to orders, slowly, the attacker,
knowing the call id (as if it leaked), tries to read the chunks on their way
to orders, read the response's chunks on their way back to web, and inject
chunks into the upload or forge credit and aborts for it. Every attempt is
refused by the server or reaches nobody; the legitimate upload arrives byte
for byte and the legitimate download too.

Across namespaces (``web`` of ``c`` calling ``orders`` of ``t``, each its own
account): a third namespace's service, even one that may answer across
namespaces (``_R_`` replies), can neither read the call's chunks nor put
anything into them, not even on the live call's own reply subject; a caller
the callee does not admit, in the very account of the legitimate caller,
cannot either, and the legitimate caller cannot push chunks to a service
that does not admit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.desired import CallerRef, ServiceIntent
from natsmesh_operator.wiring.plan import plan
from natsmesh_sidecar import subjects
from natsmesh_sidecar.app import Sidecar
from natsmesh_sidecar.transport.stream import protocol
from tests.fixtures.nats_operator import OperatorNats, Probe
from tests.integration.sidecar.sidecar_harness import destination, settings, table
from tests.integration.stream.stream_harness import AppState, pattern_sha256, start_app

NS = "t"
CALL = "5ec0de5ec0de5ec0de5ec0de"
MIB = 1024 * 1024


def tenant() -> list[ServiceIntent]:
    return [
        ServiceIntent(NS, "web"),
        ServiceIntent(
            NS, "orders", allow_same_namespace=False, allowed_callers=(CallerRef("web"),)
        ),
        ServiceIntent(NS, "evil"),
    ]


@dataclass
class Mesh:
    on: OperatorNats
    creds: dict[str, str]
    state: AppState
    caller: Sidecar


@contextlib.asynccontextmanager
async def orders_and_web(
    on: OperatorNats, creds: dict[str, str], tmp_path: Path, callee_ns: str, caller_ns: str
) -> AsyncIterator[Mesh]:
    """orders (of ``callee_ns``, before an aiohttp app) and web (of ``caller_ns``)
    as in-process sidecars with the operator's creds; every call id is CALL."""
    for name, text in creds.items():
        (tmp_path / f"{name}.creds").write_text(text)
    state = AppState()
    runner, app_port = await start_app(state)
    callee = Sidecar(
        settings("orders", callee_ns, on.url, app_port, creds_file=str(tmp_path / "orders.creds"))
    )
    caller = Sidecar(
        settings("web", caller_ns, on.url, creds_file=str(tmp_path / "web.creds")),
        table(caller_ns, "web", destinations=[destination(callee_ns, "orders")]),
    )
    await callee.start()
    await caller.start()
    await callee.wait_ready()
    await caller.wait_ready()
    try:
        yield Mesh(on, creds, state, caller)
    finally:
        await caller.stop()
        await callee.stop()
        await runner.cleanup()


@pytest.fixture
async def mesh(
    nats_operator: OperatorNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Mesh]:
    _, creds = await nats_operator.apply_tenant(tenant(), NS)
    # The worst case: the attacker knows the call's id.
    monkeypatch.setattr(protocol, "new_call_id", lambda: CALL)
    async with orders_and_web(nats_operator, creds, tmp_path, NS, NS) as m:
        yield m


async def slow_upload(
    port: int, body: bytes, paused: asyncio.Event, go: asyncio.Event, host: bytes = b"orders.t"
) -> bytes:
    """POST ``body`` to orders through web's sidecar; hold half-way until ``go``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % (host, len(body))
    )
    half = len(body) // 2
    writer.write(body[:half])
    await writer.drain()
    paused.set()
    await go.wait()
    writer.write(body[half:])
    await writer.drain()
    response = await reader.read()
    writer.close()
    return response


async def upload_then_download(mesh: Mesh, body: bytes, upload: asyncio.Task[bytes]) -> None:
    """The legitimate calls: the held upload completes byte for byte, a download too."""
    response = await asyncio.wait_for(upload, 20)
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(payload)["sha256"] == hashlib.sha256(body).hexdigest()
    size = 3 * MIB
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.caller.outbound_port)
    writer.write(b"GET /download/%d HTTP/1.1\r\nHost: orders.t\r\nConnection: close\r\n\r\n" % size)
    got = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    head, _, payload = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert hashlib.sha256(payload).hexdigest() == pattern_sha256(size)


class Ears:
    """What an attacker's subscriptions heard (nothing, if the server refused them)."""

    def __init__(self) -> None:
        self.heard: list[str] = []

    async def hear(self, msg: Msg) -> None:
        self.heard.append(msg.subject)


async def cannot_read(probe: Probe, ears: Ears, *patterns: str) -> None:
    """Each subscription refused by the server (a permissions violation)."""
    for pattern in patterns:
        await probe.nc.subscribe(pattern, cb=ears.hear)
        await probe.nc.flush()
        await probe.violation("subscription", pattern)


async def cannot_publish(probe: Probe, subject: str, headers: dict[str, str]) -> None:
    """A publish refused by the server (a permissions violation)."""
    await probe.nc.publish(subject, b"INJECTED", headers=headers)
    await probe.nc.flush()
    await probe.violation("publish", subject)


@contextlib.asynccontextmanager
async def upload_held(
    mesh: Mesh,
) -> AsyncIterator[tuple[bytes, asyncio.Task[bytes], asyncio.Event]]:
    """web's 3 MiB upload to orders, held half-way: (its body, its task, go on)."""
    body = bytes(range(256)) * (12 * 1024)
    paused, go = asyncio.Event(), asyncio.Event()
    upload = asyncio.get_running_loop().create_task(
        slow_upload(mesh.caller.outbound_port, body, paused, go)
    )
    try:
        await asyncio.wait_for(paused.wait(), 10)
        yield body, upload, go
    finally:
        go.set()
        upload.cancel()


async def test_a_third_party_can_neither_read_nor_inject_a_streamed_call(mesh: Mesh) -> None:
    attacker = await Probe.connect(mesh.on, mesh.creds["evil"], "evil")
    ears = Ears()
    try:
        async with upload_held(mesh) as (body, upload, go):
            to_callee = f"mesh._{NS}.orders.{CALL}.{NS}.web"
            # 1. reading the upload's chunks, or any call's, on the way to orders
            await cannot_read(attacker, ears, to_callee, f"mesh._{NS}.orders.>", "mesh.>")
            # 2. reading what orders sends back into web's inbox
            await cannot_read(attacker, ears, f"{subjects.inbox_prefix('web')}.>")
            # 3. injecting into the upload as web: refused by the server
            forged = {protocol.H_SEQ: "0", protocol.H_EOF: "1"}
            await cannot_publish(attacker, to_callee, forged)
            # 4. the same as itself (its own request permission allows the subject):
            #    chunks, a credit and an abort that orders never subscribed to.
            as_evil = f"mesh._{NS}.orders.{CALL}.{NS}.evil"
            for headers in (forged, {protocol.H_CREDIT: "1000000"}, {protocol.H_ABORT: "x"}):
                await attacker.nc.publish(as_evil, b"INJECTED", headers=headers)
            await attacker.nc.flush()
            # ...while the legitimate upload completes, byte for byte, and a
            # streamed download to web, the attacker still listening where it may.
            go.set()
            await upload_then_download(mesh, body, upload)
            assert mesh.state.uploads == 1
        assert ears.heard == []
    finally:
        await attacker.close()


# -- across namespaces --------------------------------------------------------------------

CALLEE_NS, CALLER_NS, THIRD_NS = "t", "c", "x"
TO_CALLEE = f"mesh._{CALLEE_NS}.orders.{CALL}.{CALLER_NS}.web"


def tenants() -> list[ServiceIntent]:
    """orders (t) and payments (t) admit one caller of c each; evil (x) admits
    a caller of c too, so it may publish replies across namespaces (``_R_.>``)."""
    return [
        ServiceIntent(
            CALLEE_NS,
            "orders",
            allow_same_namespace=False,
            allowed_callers=(CallerRef("web", CALLER_NS),),
        ),
        ServiceIntent(
            CALLEE_NS,
            "payments",
            allow_same_namespace=False,
            allowed_callers=(CallerRef("other", CALLER_NS),),
        ),
        ServiceIntent(CALLER_NS, "web", allow_same_namespace=False),
        ServiceIntent(CALLER_NS, "other", allow_same_namespace=False),
        ServiceIntent(
            THIRD_NS,
            "evil",
            allow_same_namespace=False,
            allowed_callers=(CallerRef("other", CALLER_NS),),
        ),
    ]


@pytest.fixture
async def cross(
    nats_operator: OperatorNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Mesh]:
    p = plan(tenants())
    assert not p.problems, p.problems
    async with nats_operator.applier() as a:
        report = await a.apply(p)
        assert report.ok, report.errors
    creds = {
        u.service: users.issue(u, nats_operator.keyring.account(u.namespace), ttl_seconds=600).creds
        for u in p.users
    }
    monkeypatch.setattr(protocol, "new_call_id", lambda: CALL)
    async with orders_and_web(nats_operator, creds, tmp_path, CALLEE_NS, CALLER_NS) as m:
        yield m


def reply_subjects(on: OperatorNats, namespace: str) -> list[str]:
    """The ``_R_`` reply mappings ``namespace``'s account holds (nats-server's /accountz)."""
    account = on.keyring.account(namespace).public
    url = f"{on.server.monitor_url}/accountz?acc={account}"
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - the test's own server
        return sorted(json.load(r)["account_detail"].get("responses") or {})


async def settled_replies(on: OperatorNats, want: int) -> list[str]:
    """The callee's account's reply mappings, once there are ``want`` (or after 5 s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while len(found := await asyncio.to_thread(reply_subjects, on, CALLEE_NS)) != want:
        if loop.time() > deadline:
            break
        await asyncio.sleep(0.05)
    return found


async def reaches_nobody(probe: Probe, subject: str) -> bool:
    """The server answers "no responders": nobody, in any account, hears ``subject``."""
    try:
        await probe.nc.request(subject, b"INJECTED", timeout=2, headers={protocol.H_ABORT: "x"})
    except NoRespondersError:
        return True
    return False


async def test_a_third_namespace_can_neither_read_nor_inject_a_cross_namespace_call(
    cross: Mesh,
) -> None:
    attacker = await Probe.connect(cross.on, cross.creds["evil"], "evil")
    ears = Ears()
    try:
        async with upload_held(cross) as (body, upload, go):
            # The live call's one reply mapping: where orders answers web.
            live = await settled_replies(cross.on, 1)
            assert len(live) == 1, live
            assert live[0].startswith(subjects.SERVICE_REPLY_PREFIX), live
            # 1. reading the chunks, the call subjects, the replies or web's inbox
            await cannot_read(
                attacker,
                ears,
                TO_CALLEE,
                f"mesh._{CALLEE_NS}.>",
                f"{subjects.SERVICE_REPLY_PREFIX}>",
                f"{subjects.inbox_prefix('web')}.>",
            )
            # 2. injecting into the call as web: refused by the server
            await cannot_publish(attacker, TO_CALLEE, {protocol.H_SEQ: "0", protocol.H_EOF: "1"})
            # 3. as itself (its permission allows the subject), and on the live
            #    call's own reply subject (it may publish _R_ replies): its
            #    account imports neither, nobody hears them.
            refused = len(attacker.errors)
            as_evil = f"mesh._{CALLEE_NS}.orders.{CALL}.{THIRD_NS}.evil"
            assert await reaches_nobody(attacker, as_evil)
            assert await reaches_nobody(attacker, live[0])
            assert attacker.errors[refused:] == []  # allowed, and still nobody's
            go.set()
            await upload_then_download(cross, body, upload)
        assert ears.heard == []
        # Every stream closed its reply mapping.
        assert await settled_replies(cross.on, 0) == []
    finally:
        await attacker.close()


async def test_a_caller_cannot_push_chunks_to_a_service_it_is_not_granted(cross: Mesh) -> None:
    """other shares web's account but orders does not admit it; web is admitted
    by orders, not by payments."""
    other = await Probe.connect(cross.on, cross.creds["other"], "other")
    web = await Probe.connect(cross.on, cross.creds["web"], "web")
    ears = Ears()
    try:
        async with upload_held(cross) as (body, upload, go):
            # In web's own account, before they cross: neither readable nor forgeable.
            await cannot_read(other, ears, TO_CALLEE, f"{subjects.inbox_prefix('web')}.>")
            await cannot_publish(other, TO_CALLEE, {protocol.H_SEQ: "0"})
            # Its own call subjects to orders, which does not admit it: not imported.
            as_other = f"mesh._{CALLEE_NS}.orders.{CALL}.{CALLER_NS}.other"
            assert await reaches_nobody(other, as_other)
            # web to payments, which does not admit web (it admits other).
            to_payments = f"mesh._{CALLEE_NS}.payments.{CALL}.{CALLER_NS}.web"
            assert await reaches_nobody(web, to_payments)
            go.set()
            await upload_then_download(cross, body, upload)
        assert ears.heard == []
    finally:
        await other.close()
        await web.close()
