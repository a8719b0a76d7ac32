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
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from natsmesh_operator.wiring.desired import CallerRef, ServiceIntent
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


@pytest.fixture
async def mesh(
    nats_operator: OperatorNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Mesh]:
    _, creds = await nats_operator.apply_tenant(tenant(), NS)
    for name, text in creds.items():
        (tmp_path / f"{name}.creds").write_text(text)
    # The worst case: the attacker knows the call's id.
    monkeypatch.setattr(protocol, "new_call_id", lambda: CALL)
    state = AppState()
    runner, app_port = await start_app(state)
    callee = Sidecar(
        settings(
            "orders", NS, nats_operator.url, app_port, creds_file=str(tmp_path / "orders.creds")
        )
    )
    caller = Sidecar(
        settings("web", NS, nats_operator.url, creds_file=str(tmp_path / "web.creds")),
        table(NS, "web", destinations=[destination(NS, "orders")]),
    )
    await callee.start()
    await caller.start()
    await callee.wait_ready()
    await caller.wait_ready()
    try:
        yield Mesh(nats_operator, creds, state, caller)
    finally:
        await caller.stop()
        await callee.stop()
        await runner.cleanup()


async def slow_upload(port: int, body: bytes, paused: asyncio.Event, go: asyncio.Event) -> bytes:
    """POST ``body`` to orders through web's sidecar; hold half-way until ``go``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: orders.t\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % len(body)
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


async def test_a_third_party_can_neither_read_nor_inject_a_streamed_call(mesh: Mesh) -> None:
    attacker = await Probe.connect(mesh.on, mesh.creds["evil"], "evil")
    heard: list[str] = []

    async def hear(msg: Msg) -> None:
        heard.append(msg.subject)

    body = bytes(range(256)) * (12 * 1024)  # 3 MiB: past one message, several chunks
    paused, go = asyncio.Event(), asyncio.Event()
    upload = asyncio.get_running_loop().create_task(
        slow_upload(mesh.caller.outbound_port, body, paused, go)
    )
    try:
        await asyncio.wait_for(paused.wait(), 10)
        to_callee = f"mesh._{NS}.orders.{CALL}.{NS}.web"
        # 1. reading the upload's chunks, or any call's, on the way to orders
        for pattern in (to_callee, f"mesh._{NS}.orders.>", "mesh.>"):
            await attacker.nc.subscribe(pattern, cb=hear)
            await attacker.nc.flush()
            await attacker.violation("subscription", pattern)
        # 2. reading what orders sends back into web's inbox
        back = f"{subjects.inbox_prefix('web')}.>"
        await attacker.nc.subscribe(back, cb=hear)
        await attacker.nc.flush()
        await attacker.violation("subscription", back)
        # 3. injecting into the upload as web: refused by the server
        forged = {protocol.H_SEQ: "0", protocol.H_EOF: "1"}
        await attacker.nc.publish(to_callee, b"INJECTED", headers=forged)
        await attacker.nc.flush()
        await attacker.violation("publish", to_callee)
        # 4. the same as itself (its own request permission allows the subject):
        #    chunks, a credit and an abort that orders never subscribed to.
        as_evil = f"mesh._{NS}.orders.{CALL}.{NS}.evil"
        for headers in (forged, {protocol.H_CREDIT: "1000000"}, {protocol.H_ABORT: "x"}):
            await attacker.nc.publish(as_evil, b"INJECTED", headers=headers)
        await attacker.nc.flush()
        # ...while the legitimate upload completes, byte for byte.
        go.set()
        response = await asyncio.wait_for(upload, 20)
        head, _, payload = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert json.loads(payload)["sha256"] == hashlib.sha256(body).hexdigest()
        assert mesh.state.uploads == 1
        # and a streamed download to web, with the attacker still listening where it may
        size = 3 * MIB
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.caller.outbound_port)
        writer.write(
            b"GET /download/%d HTTP/1.1\r\nHost: orders.t\r\nConnection: close\r\n\r\n" % size
        )
        got = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        head, _, payload = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert hashlib.sha256(payload).hexdigest() == pattern_sha256(size)
        assert heard == []
    finally:
        go.set()
        upload.cancel()
        await attacker.close()
