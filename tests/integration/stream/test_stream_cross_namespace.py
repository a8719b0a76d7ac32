"""Streamed calls and WebSockets across namespaces, through real sidecars.

Two namespaces, each its own NATS account on an operator-mode nats-server,
wired by the operator's own plan and applier: ``web`` in ``front`` calls
``orders`` and ``legacy`` in ``shop``, both of which admit it. Each sidecar is
a ``python -m natsmesh_sidecar`` process following its table in the route
KV; the app is aiohttp (uploads hashed, downloads, Server-Sent Events and a
WebSocket echo), the clients curl and the ``websockets`` package.

``legacy``'s creds are those of an older operator: its user JWT lacks the
grant to subscribe to web's call subjects, as a sidecar still running with
the Secret it was started with during an upgrade. It answers as before: an
upload over one message 413, a large response 502, a WebSocket 501.

Across namespaces the callee answers on ``_R_`` subjects the server maps
back into the caller's account; the tests also read the server's own count
of those mappings (``/accountz``): one per live stream, none left after.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from websockets.exceptions import InvalidStatus

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.desired import CallerRef, ServiceIntent
from natsmesh_operator.wiring.permissions import Permissions
from natsmesh_operator.wiring.plan import MeshPlan, plan
from natsmesh_sidecar import subjects
from tests.fixtures.nats_operator import OperatorNats, start_operator_nats
from tests.integration.stream import ws_harness
from tests.integration.stream.stream_harness import (
    BLOCK,
    AppState,
    SidecarProc,
    curl,
    make_app,
    pattern_sha256,
    run_app,
    start_sidecar,
    stop_sidecar,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

MIB = 1024 * 1024
SIZE = 3 * MIB + 7


def tenants() -> list[ServiceIntent]:
    return [
        ServiceIntent("front", "web", allow_same_namespace=False),
        *(
            ServiceIntent(
                "shop",
                name,
                allow_same_namespace=False,
                allowed_callers=(CallerRef("web", "front"),),
            )
            for name in ("orders", "legacy")
        ),
    ]


def older_operators(p: MeshPlan) -> Permissions:
    """legacy's permissions as an operator before cross-namespace streams gave them."""
    granted = p.user("shop", "legacy").permissions
    calls = subjects.stream_serve_subject("shop", "legacy", "front", "web")
    assert calls in granted.sub_allow
    return replace(granted, sub_allow=tuple(s for s in granted.sub_allow if s != calls))


@dataclass
class Mesh:
    on: OperatorNats
    app: AppState
    ws: ws_harness.WsState
    web: SidecarProc

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.web.listen_port}{path}"

    async def mappings_settle(self, want: int) -> int:
        """shop's ``_R_`` mappings once they are ``want`` (or 5 s passed)."""
        return await self.on.reply_mappings_settle("shop", want)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    workdir = tmp_path_factory.mktemp("xns")
    on = start_operator_nats(workdir)
    sides: list[SidecarProc] = []
    runner: web.AppRunner | None = None
    try:
        p = plan(tenants())
        assert not p.problems, p.problems
        async with on.applier() as a:
            report = await a.apply(p)
            assert report.ok, report.errors
        state, ws_state = AppState(), ws_harness.WsState()
        runner, app_port = await run_app(ws_harness.make_app(ws_state, make_app(state)))
        started = []
        for ns, name in (("shop", "orders"), ("shop", "legacy"), ("front", "web")):
            user = p.user(ns, name)
            if name == "legacy":
                user = replace(user, permissions=older_operators(p))
            issued = users.issue(user, on.keyring.account(ns), ttl_seconds=3600)
            (workdir / f"{name}.creds").write_text(issued.creds)
            side_dir = workdir / name
            side_dir.mkdir()
            env = {
                "NATSMESH_NAMESPACE": ns,
                "NATSMESH_CREDS_FILE": str(workdir / f"{name}.creds"),
                "NATSMESH_TABLE_FILE": "",  # its table from the route KV, as a pod's
                "NATSMESH_STREAM_IDLE_TIMEOUT_SECONDS": "2",
            }
            port = 0 if name == "web" else app_port
            started.append(start_sidecar(name, on.url, side_dir, app_port=port, env=env))
        for side in await asyncio.gather(*started, return_exceptions=True):
            if isinstance(side, BaseException):
                raise side
            sides.append(side)
        yield Mesh(on, state, ws_state, sides[-1])
    finally:
        for side in sides:
            stop_sidecar(side)
        if runner is not None:
            await runner.cleanup()
        on.server.stop()


async def test_upload_and_download_over_one_message_cross_namespaces(
    mesh: Mesh, tmp_path: Path
) -> None:
    upload = tmp_path / "upload.bin"
    upload.write_bytes((BLOCK * 4)[:SIZE])
    # Content-Length, then chunked (no length known): the app hashes what came.
    rc, out, err = await curl("--data-binary", f"@{upload}", mesh.url("/upload"))
    assert rc == 0, err
    assert json.loads(out) == {"sha256": pattern_sha256(SIZE), "bytes": SIZE, "te": ""}
    rc, out, err = await curl(
        "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{upload}", mesh.url("/upload")
    )
    assert rc == 0, err
    assert json.loads(out)["sha256"] == pattern_sha256(SIZE)
    for query in ("", "?chunked=1"):
        rc, out, err = await curl("-D", "-", mesh.url(f"/download/{SIZE}{query}"))
        assert rc == 0, err
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert hashlib.sha256(body).hexdigest() == pattern_sha256(SIZE)
    # Every stream closed the reply mapping it opened: none waits for the
    # server's response threshold.
    assert await mesh.mappings_settle(0) == 0


async def test_server_sent_events_cross_namespaces_as_they_are_written(mesh: Mesh) -> None:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sSN",
        "-H",
        "Host: orders.shop",
        mesh.url("/sse?n=3&every=1"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    t0 = time.monotonic()
    seen: list[float] = []
    live = -1
    while len(seen) < 3:
        line = await asyncio.wait_for(proc.stdout.readline(), 5)
        assert line, "the stream ended early"
        if line.startswith(b"data: event"):
            seen.append(time.monotonic() - t0)
            if len(seen) == 1:
                # The stream's one reply mapping (the head's took its one answer).
                live = await asyncio.to_thread(mesh.on.reply_mappings, "shop")
    assert await asyncio.wait_for(proc.wait(), 5) == 0
    assert live == 1
    assert seen[0] < 1.0, seen
    for earlier, later in itertools.pairwise(seen):
        assert 0.5 < later - earlier < 1.6, seen
    assert await mesh.mappings_settle(0) == 0


async def test_websocket_echo_cross_namespaces(mesh: Mesh) -> None:
    closes = len(mesh.ws.closes)
    async with ws_harness.connect_via(mesh.web.listen_port, "/echo", max_size=None) as ws:
        assert await ws_harness.echo_once(ws, "hello") == "hello"
        assert await ws_harness.echo_once(ws, b"\x00\x01\xff") == b"\x00\x01\xff"
        big = os.urandom(2 * MIB)
        assert await ws_harness.echo_once(ws, big) == big
        for i in range(100):
            await ws.send(f"m{i}")
        got = [await asyncio.wait_for(ws.recv(), 5) for _ in range(100)]
        assert got == [f"m{i}" for i in range(100)]
        await ws.close(code=4001, reason="done")
    await asyncio.wait_for(mesh.ws.ended.wait(), 5)
    assert mesh.ws.closes[closes:] == [(4001, "done")]
    assert await mesh.mappings_settle(0) == 0


async def test_a_callee_without_the_grant_answers_as_before(mesh: Mesh, tmp_path: Path) -> None:
    """legacy's JWT lacks the call subjects: the old answers, never a hang."""
    upload = tmp_path / "upload.bin"
    upload.write_bytes((BLOCK * 2)[: 2 * MIB])
    rc, out, err = await curl(
        "-w",
        "\n%{http_code}",
        "--data-binary",
        f"@{upload}",
        mesh.url("/upload"),
        host="legacy.shop",
    )
    assert rc == 0, err
    assert out.rsplit(b"\n", 1)[1] == b"413", out[-300:]
    t0 = time.monotonic()
    rc, out, err = await curl(
        "-w", "\n%{http_code}", mesh.url(f"/download/{SIZE}"), host="legacy.shop"
    )
    assert rc == 0, err
    body, status = out.rsplit(b"\n", 1)
    assert status == b"502"
    assert json.loads(body)["error"] == "response_too_large"
    # At once, not after the idle timeout (2 s): the app is read past one message.
    assert time.monotonic() - t0 < 1.5
    # What fits one message still goes, unary as ever.
    rc, out, err = await curl(mesh.url("/download/1000"), host="legacy.shop")
    assert (rc, len(out)) == (0, 1000)
    with pytest.raises(InvalidStatus) as refused:
        async with ws_harness.connect_via(mesh.web.listen_port, "/echo", host="legacy.shop"):
            pass
    assert refused.value.response.status_code == 501
    # ... while orders, with the grant, takes the same upload.
    rc, out, err = await curl("--data-binary", f"@{upload}", mesh.url("/upload"))
    assert rc == 0, err
    assert json.loads(out)["bytes"] == 2 * MIB
