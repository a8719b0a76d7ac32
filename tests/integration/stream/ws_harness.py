"""WebSocket through the mesh: an aiohttp WebSocket app behind real sidecars.

The app is aiohttp's WebSocket server, the client the ``websockets``
package: neither end is our code. The mesh is an operator-mode nats-server
with a tenant and a NatsRoute planned and applied by the operator's own
wiring code: ``web`` may call ``orders`` (v1, and v2 for ``x-canary: 1``,
each version an app of its own), ``evil`` may not; each sidecar is a
``python -m natsmesh_sidecar`` process with its creds, following its table
in the route KV as a pod would (so their RSS is their own).
``python -m tests.integration.stream.ws_harness --port N`` serves the app
alone (bench/websocket.py runs it so).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.desired import CallerRef, ServiceIntent
from natsmesh_operator.wiring.plan import plan
from natsmesh_operator.wiring.routes import RouteDestination, RouteIntent, RouteRule
from natsmesh_sidecar.config import Match
from tests.fixtures.nats_operator import OperatorNats
from tests.integration.stream.stream_harness import (
    SidecarProc,
    run_app,
    serve_alone,
    start_sidecar,
    stop_sidecar,
)

NS = "shop"


@dataclass
class WsState:
    #: (close code, reason) of every socket the app saw end, in order: the
    #: client's close frame, the app's own, or (None, CLOSED/ERROR) without one.
    closes: list[tuple[int | None, str]] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    open: int = 0
    #: The headers of the last upgrade the app accepted.
    last_headers: dict[str, str] = field(default_factory=dict)


STATE = web.AppKey("ws_state", WsState)


async def _echo(request: web.Request) -> web.WebSocketResponse:
    """Echo text and binary; ``close <code> <reason>`` makes the app close."""
    state = request.app[STATE]
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)
    state.open += 1
    state.last_headers = dict(request.headers)
    end: tuple[int | None, str] = (None, "")
    try:
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data.startswith("close "):
                    _, code, reason = msg.data.split(" ", 2)
                    await ws.close(code=int(code), message=reason.encode())
                    end = (int(code), reason)
                    break
                await ws.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                # The client's close frame: its code and reason, as sent.
                end = (msg.data, msg.extra or "")
                await ws.close()
                break
            else:  # CLOSED or ERROR: the connection went without a close frame
                end = (None, f"{msg.type.name}")
                break
    finally:
        state.open -= 1
        state.closes.append(end)
        state.ended.set()
    return ws


async def _ping(request: web.Request) -> web.WebSocketResponse:
    """The app pings the client and reports the pong it got back."""
    ws = web.WebSocketResponse(autoping=False)
    await ws.prepare(request)
    await ws.ping(b"from-app")
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.PONG:
            await ws.send_str(f"pong:{msg.data.decode()}")
        elif msg.type == aiohttp.WSMsgType.PING:
            await ws.pong(msg.data)
        elif msg.type == aiohttp.WSMsgType.CLOSE:
            await ws.close()
    return ws


async def _refuse(request: web.Request) -> web.Response:
    """Refuses the upgrade: a plain HTTP answer, as an app checking a token would."""
    return web.json_response({"error": "no token"}, status=401, headers={"x-refused": "yes"})


def make_app(state: WsState, app: web.Application | None = None) -> web.Application:
    """The WebSocket routes, in a new app or added to ``app``."""
    app = web.Application() if app is None else app
    app[STATE] = state
    app.router.add_get("/echo", _echo)
    app.router.add_get("/ping", _ping)
    app.router.add_get("/refuse", _refuse)
    return app


async def start_app(state: WsState, port: int = 0) -> tuple[web.AppRunner, int]:
    return await run_app(make_app(state), port)


#: The sidecars by NatsService resource: (service, version).
SIDES = {
    "orders": ("orders", "v1"),
    "orders-v2": ("orders", "v2"),
    "web": ("web", "v1"),
    "evil": ("evil", "v1"),
}


def tenant() -> list[ServiceIntent]:
    """web may call orders (versions v1 and v2), evil may not."""
    return [
        ServiceIntent(NS, "web", allow_same_namespace=False),
        ServiceIntent(NS, "evil", allow_same_namespace=False),
        *(
            ServiceIntent(
                NS,
                "orders",
                version=v,
                allow_same_namespace=False,
                allowed_callers=(CallerRef("web"),),
                resource=resource,
            )
            for resource, (_, v) in SIDES.items()
            if resource.startswith("orders")
        ),
    ]


def canary_route() -> RouteIntent:
    """A NatsRoute: ``x-canary: 1`` goes to v2, everything else to v1."""
    return RouteIntent(
        NS,
        "orders",
        rules=(
            RouteRule(
                name="canary",
                destinations=(RouteDestination("v2"),),
                match=Match(headers={"x-canary": "1"}),
            ),
            RouteRule(name="stable", destinations=(RouteDestination("v1"),)),
        ),
    )


async def applied(on: OperatorNats) -> dict[str, str]:
    """The tenant and its route planned and pushed; each resource's creds."""
    p = plan(tenant(), [canary_route()])
    assert not p.problems, p.problems
    async with on.applier() as a:
        report = await a.apply(p)
        assert report.ok, report.errors
    account = on.keyring.account(NS)
    return {name: users.issue(p.user(NS, name), account, ttl_seconds=3600).creds for name in SIDES}


#: The sidecars: (service, version) by name.
SIDES = {
    "orders": ("orders", "v1"),
    "orders-v2": ("orders", "v2"),
    "web": ("web", ""),
    "evil": ("evil", ""),
}


@dataclass
class WsMesh:
    #: What each version's app saw.
    states: dict[str, WsState]
    app_ports: dict[str, int]
    on: OperatorNats
    sides: dict[str, SidecarProc]
    workdir: Path
    env: dict[str, str]

    @property
    def state(self) -> WsState:
        return self.states["v1"]

    def port(self, name: str = "web") -> int:
        return self.sides[name].listen_port

    async def restart(self, name: str) -> None:
        stop_sidecar(self.sides[name])
        self.sides[name] = await self._start(name)

    async def _start(self, name: str) -> SidecarProc:
        service, version = SIDES[name]
        env = {
            "NATSMESH_CREDS_FILE": str(self.workdir / f"{name}.creds"),
            # No table file: each sidecar follows its own key in the route KV.
            "NATSMESH_TABLE_FILE": "",
            "NATSMESH_VERSION": version,
            **self.env,
        }
        # Its own directory: the harness names a sidecar's log after its service.
        workdir = self.workdir / name
        workdir.mkdir(exist_ok=True)
        app_port = self.app_ports[version] if service == "orders" else 0
        return await start_sidecar(service, self.on.url, workdir, app_port=app_port, env=env)


@contextlib.asynccontextmanager
async def running_ws_mesh(on: OperatorNats, workdir: Path, **env: str) -> AsyncIterator[WsMesh]:
    """The tenant applied, an app per version of orders, and a sidecar for each."""
    for name, text in (await applied(on)).items():
        (workdir / f"{name}.creds").write_text(text)
    states = {v: WsState() for v in ("v1", "v2")}
    runners = {v: await start_app(state) for v, state in states.items()}
    ports = {v: port for v, (_, port) in runners.items()}
    mesh = WsMesh(states, ports, on, {}, workdir, env)
    started = await asyncio.gather(*(mesh._start(s) for s in SIDES), return_exceptions=True)
    try:
        for name, side in zip(SIDES, started, strict=True):
            if isinstance(side, BaseException):
                raise side
            mesh.sides[name] = side
        yield mesh
    finally:
        for side in mesh.sides.values():
            stop_sidecar(side)
        for runner, _ in runners.values():
            await runner.cleanup()


def connect_via(port: int, path: str, host: str = "orders.shop", **kw: Any) -> connect:
    """A ``websockets`` client to ``host`` through a sidecar's outbound listener
    (the connection is to the sidecar, the Host header names the service)."""
    sock = socket.create_connection(("127.0.0.1", port))
    return connect(f"ws://{host}{path}", sock=sock, open_timeout=5, close_timeout=5, **kw)


async def echo_once(ws: ClientConnection, message: str | bytes) -> str | bytes:
    await ws.send(message)
    return await asyncio.wait_for(ws.recv(), 5)


if __name__ == "__main__":
    serve_alone(lambda port: start_app(WsState(), port))
