"""Keep-alive connections behave like a proxy's, in both directions.

A pooled connection idle past every timeout the sidecar has must never get an
answer to a request it did not send (the spurious 408 of issue 14), an idle
connection is closed silently, and a pooled connection to the app that the
app's server dropped for idleness is never surfaced as a 502.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from natsmesh_sidecar.app import Sidecar
from tests.fixtures.nats_server import NatsServer
from tests.integration.sidecar.sidecar_harness import (
    TestApp,
    destination,
    settings,
    table,
)

pytestmark = pytest.mark.integration


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    raise AssertionError(f"no content-length in {head!r}")


async def _pair(
    nats: NatsServer, app_port: int, *, header_timeout: float, idle_timeout: float, **kw: object
) -> tuple[Sidecar, Sidecar]:
    server = Sidecar(
        settings("orders", "shop", nats.url, app_port, **kw),
        table("shop", "orders"),
        header_timeout=header_timeout,
    )
    caller = Sidecar(
        settings("web", "shop", nats.url),
        table("shop", "web", destinations=[destination("shop", "orders")], known=("orders.shop",)),
        header_timeout=header_timeout,
        idle_timeout=idle_timeout,
    )
    await server.start()
    await caller.start()
    await server.wait_ready()
    await caller.wait_ready()
    return caller, server


async def test_pooled_connection_idle_past_header_timeout_is_not_408(
    nats_server: NatsServer,
) -> None:
    app = await TestApp().start()
    caller, server = await _pair(nats_server, app.port, header_timeout=0.3, idle_timeout=30)
    url = f"http://127.0.0.1:{caller.outbound_port}/pay"
    try:
        created: list[object] = []

        async def on_create(*_: object) -> None:
            created.append(1)

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(on_create)
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
            for pause in (0.0, 0.2, 1.5):  # the last pause is 5x the header deadline
                await asyncio.sleep(pause)
                async with session.post(url, headers={"Host": "orders"}, data=b"x" * 100) as r:
                    assert r.status == 200, await r.text()
                    assert json.loads(await r.read())["body"] == "x" * 100
        # All three rode one pooled connection: the sidecar did not drop it.
        assert len(created) == 1

        # The same on a bare socket, which (like http.client) reads whatever is
        # buffered as the next answer: idle, nothing arrives; then a request works.
        reader, writer = await asyncio.open_connection("127.0.0.1", caller.outbound_port)
        req = b"POST /pay HTTP/1.1\r\nHost: orders\r\nContent-Length: 3\r\n\r\nabc"
        for _ in range(2):
            writer.write(req)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            await reader.readexactly(_content_length(head))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 1.5)
        writer.close()
    finally:
        await caller.stop()
        await server.stop()
        await app.stop()


async def test_idle_connection_closed_silently_after_idle_timeout(
    nats_server: NatsServer,
) -> None:
    app = await TestApp().start()
    caller, server = await _pair(nats_server, app.port, header_timeout=0.2, idle_timeout=0.5)
    try:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", caller.outbound_port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: orders\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(_content_length(head))
        start = loop.time()
        # Idle: the next thing on the wire is EOF, with no bytes (no 408, no body).
        rest = await asyncio.wait_for(reader.read(), 5)
        assert rest == b""
        assert loop.time() - start >= 0.45
        writer.close()
    finally:
        await caller.stop()
        await server.stop()
        await app.stop()


async def test_app_closing_idle_keepalive_never_surfaces(nats_server: NatsServer) -> None:
    # A real server library with a keep-alive timeout shorter than the pause:
    # aiohttp closes our pooled connection; the sidecar must not answer 502.
    seen: list[str] = []

    async def handle(req: web.Request) -> web.Response:
        seen.append(req.path)
        return web.json_response({"path": req.path})

    webapp = web.Application()
    webapp.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(webapp, keepalive_timeout=0.3)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    # Our own pool bound is longer than the app's here, to exercise the race
    # where the app has closed the connection we are about to reuse.
    caller, server = await _pair(
        nats_server, port, header_timeout=5, idle_timeout=30, app_idle_timeout_seconds=10
    )
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(4):
                async with session.post(
                    f"http://127.0.0.1:{caller.outbound_port}/n/{i}",
                    headers={"Host": "orders"},
                    data=b"{}",
                ) as r:
                    assert r.status == 200, await r.text()
                await asyncio.sleep(0.6)
        assert seen == [f"/n/{i}" for i in range(4)]
    finally:
        await caller.stop()
        await server.stop()
        await runner.cleanup()
