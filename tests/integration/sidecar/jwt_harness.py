"""Helpers for sidecars on an operator-mode nats-server: creds files, steady load, waits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.plan import MeshPlan, plan
from natsmesh_operator.wiring.routes import RouteIntent, RouteRule
from natsmesh_sidecar.app import Sidecar
from tests.fixtures.nats_operator import OperatorNats, shop_intents
from tests.integration.sidecar.sidecar_harness import Client, Response, settings

logger = logging.getLogger(__name__)

NS = "shop"


def write_creds(path: Path, creds: str) -> None:
    """Atomically, as the kubelet updates a mounted Secret (a rename, never a torn file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(creds)
    os.replace(tmp, path)


def issue(mesh_or_on: OperatorNats, p: MeshPlan, service: str) -> users.IssuedUser:
    ring = mesh_or_on.keyring
    return users.issue(p.user(NS, service), ring.account(NS), user_key=ring.user(NS, service))


async def applied_shop(
    on: OperatorNats, tmp_path: Path, routes: Sequence[RouteIntent] = ()
) -> tuple[MeshPlan, dict[str, Path]]:
    """The shop planned and pushed to the server; gateway's and orders' creds files."""
    p = plan(shop_intents(NS), list(routes))
    assert not p.problems, p.problems
    async with on.applier() as a:
        report = await a.apply(p)
        assert report.ok, report.errors
    creds = {}
    for svc in ("gateway", "orders"):
        creds[svc] = tmp_path / f"{svc}.creds"
        write_creds(creds[svc], issue(on, p, svc).creds)
    return p, creds


async def wait_for(cond: object, within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def metric(sidecar: Sidecar, name: str, **labels: str) -> float:
    value = sidecar.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


class Load:
    """A few keep-alive clients calling orders in a loop, recording every answer."""

    def __init__(self, port: int, clients: int = 4) -> None:
        self.port = port
        self.clients = clients
        self.results: list[tuple[float, int, bytes]] = []
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def _worker(self) -> None:
        client = await Client.open(self.port)
        try:
            for _ in range(100_000):  # bounded; stopped long before
                if self.stop.is_set():
                    return
                try:
                    r: Response = await client.request("GET", "/ok", host="orders", wait=5.0)
                    self.results.append((time.monotonic(), r.status, r.body))
                except (ConnectionError, TimeoutError) as exc:
                    self.results.append((time.monotonic(), 0, repr(exc).encode()))
                    client.close()
                    client = await Client.open(self.port)
                await asyncio.sleep(0.002)
        finally:
            client.close()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._worker()) for _ in range(self.clients)]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 10)

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, s, _ in self.results:
            out[s] = out.get(s, 0) + 1
        return out


class CutProxy:
    """A TCP relay to the NATS server whose connections can be cut: what a
    caller sees when its own connection drops (a node's network blip, a
    server's restart) while the callee stays connected."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.down = False
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> CutProxy:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    async def cut(self, seconds: float) -> None:
        """Close every relayed connection and refuse new ones for ``seconds``."""
        self.down = True
        for w in list(self.writers):
            w.transport.abort()
        await asyncio.sleep(seconds)
        self.down = False

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.transport.abort()


@dataclass
class RoutedShop:
    """The shop's gateway and orders users on an operator-mode server, with
    one NatsRoute rule for orders; sidecars are started by the test."""

    on: OperatorNats
    plan: MeshPlan
    creds: dict[str, Path]
    sidecars: list[Sidecar] = field(default_factory=list)

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, on: OperatorNats, tmp_path: Path, rule: RouteRule
    ) -> AsyncIterator[RoutedShop]:
        """The shop with ``rule`` for orders; every sidecar started is stopped after."""
        p, creds = await applied_shop(on, tmp_path, [RouteIntent(NS, "orders", rules=(rule,))])
        shop = cls(on, p, creds)
        try:
            yield shop
        finally:
            await shop.close()

    async def orders(self, app_port: int, **kw: object) -> Sidecar:
        """An orders replica in front of ``app_port``, started (not waited for)."""
        sidecar = Sidecar(
            settings(
                "orders",
                NS,
                self.on.url,
                app_port,
                creds_file=str(self.creds["orders"]),
                **kw,
            )
        )
        self.sidecars.append(sidecar)
        await sidecar.start()
        return sidecar

    async def gateway(self, nats_url: str = "") -> Sidecar:
        sidecar = Sidecar(
            settings("gateway", NS, nats_url or self.on.url, creds_file=str(self.creds["gateway"]))
        )
        self.sidecars.append(sidecar)
        await sidecar.start()
        await sidecar.wait_ready()
        return sidecar

    async def close(self) -> None:
        for sidecar in reversed(self.sidecars):
            await sidecar.stop()
