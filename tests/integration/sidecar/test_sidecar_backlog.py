"""Inbound back-pressure: busy app slots queue messages in order; a full backlog answers 503."""

from __future__ import annotations

import asyncio
import time

import pytest

from natsmesh_sidecar.app import Sidecar
from natsmesh_sidecar.calls import inbound
from tests.fixtures.nats_server import NatsServer
from tests.integration.sidecar.sidecar_harness import (
    AppReply,
    AppRequest,
    TestApp,
    destination,
    request,
    settings,
    table,
)

pytestmark = pytest.mark.integration


async def test_backlog_is_served_in_order_and_bounded(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inbound, "MAX_BACKLOG", 2)
    release = asyncio.Event()
    seen: list[str] = []

    async def handler(req: AppRequest) -> AppReply:
        seen.append(req.path)
        await release.wait()
        return AppReply(200, [], req.path.encode())

    app = await TestApp(handler).start()
    server = Sidecar(
        settings("orders", "shop", nats_server.url, app.port, max_inflight=1),
        table("shop", "orders"),
    )
    caller = Sidecar(
        settings("web", "shop", nats_server.url),
        table("shop", "web", destinations=[destination("shop", "orders", timeoutMs=5000)]),
    )
    await server.start()
    await caller.start()
    try:
        await server.wait_ready()
        await caller.wait_ready()
        port = caller.outbound_port
        first = asyncio.create_task(request(port, "GET", "/1"))
        await asyncio.sleep(0.2)  # /1 holds the only slot
        queued = [asyncio.create_task(request(port, "GET", f"/{i}")) for i in (2, 3)]
        await asyncio.sleep(0.2)  # both wait in the backlog
        assert server.inbound.pending() == 3
        t0 = time.monotonic()
        over = await request(port, "GET", "/4")
        assert over.status == 503
        assert over.json()["error"] == "overloaded"
        assert time.monotonic() - t0 < 1.0
        release.set()
        results = await asyncio.wait_for(asyncio.gather(first, *queued), 5)
        assert [r.status for r in results] == [200, 200, 200]
        assert [r.body for r in results] == [b"/1", b"/2", b"/3"]
        assert seen == ["/1", "/2", "/3"]
        assert server.inbound.pending() == 0
    finally:
        release.set()
        await caller.stop()
        await server.stop()
        await app.stop()
