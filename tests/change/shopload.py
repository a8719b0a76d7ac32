"""The shop under continuous traffic while the mesh changes: replicas, load, creds mirror.

Each replica is the demo's own app (:mod:`examples.apps.shop`) behind an
in-process :class:`~natsmesh_sidecar.app.Sidecar` holding the creds the real
operator wrote into the service's Secret. :class:`SecretMirror` plays the
kubelet: it copies each creds Secret into its file (atomically) whenever it
changes. :class:`Traffic` is the ingress: paced checkouts on the gateway's app
(gateway -> orders -> payments, two mesh hops, and an ``order.created`` event
per order that payments consumes), every answer recorded with its latency.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from examples.apps.shop import MeshClient, Shop, serve_connection
from lightkube import AsyncClient
from lightkube.resources.core_v1 import Secret

from natsmesh_sidecar.app import Sidecar
from natsmesh_sidecar.policy import permissions
from tests.integration.sidecar.sidecar_harness import settings

logger = logging.getLogger(__name__)

#: Paced checkouts per second through the gateway (each is two mesh hops and an event).
RATE = 150
#: Concurrent ingress connections sharing that rate.
WORKERS = 8
#: Seconds of steady traffic measured before a change starts.
STEADY = 2.0
#: Seconds after a change whose traffic still counts as "during" it.
AFTER = 1.0
#: A request slower than this counts as failed (nothing in the shop takes near it).
REQUEST_TIMEOUT = 10.0


class SecretMirror:
    """Copies the creds Secret of each named service into its file on every change."""

    def __init__(self, kube: AsyncClient, namespace: str, workdir: Path) -> None:
        self.kube = kube
        self.namespace = namespace
        self.workdir = workdir
        self.services: list[str] = []
        self.seen: dict[str, str] = {}
        self.writes: dict[str, int] = {}
        self.task: asyncio.Task[None] | None = None

    def path(self, service: str) -> Path:
        return self.workdir / f"{service}.creds"

    async def sync(self, service: str) -> bool:
        """Write ``service``'s creds file if the Secret changed; whether it did."""
        try:
            secret = await self.kube.get(
                Secret, f"natsmesh-{service}-creds", namespace=self.namespace
            )
        except Exception as exc:  # a Secret being re-created: the next round has it
            logger.debug("creds of %s not readable: %s", service, exc)
            return False
        raw = (secret.data or {}).get("user.creds")
        if not raw or self.seen.get(service) == raw:
            return False
        path = self.path(service)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(base64.b64decode(raw))
        os.replace(tmp, path)
        self.seen[service] = raw
        self.writes[service] = self.writes.get(service, 0) + 1
        return True

    async def _loop(self, period: float) -> None:
        while True:
            for service in list(self.services):
                await self.sync(service)
            await asyncio.sleep(period)

    async def watch(self, *services: str) -> None:
        """Mirror ``services`` from now on; each must have its Secret already."""
        for service in services:
            if not await self.sync(service):
                raise AssertionError(f"no creds Secret for {service} in {self.namespace}")
            self.services.append(service)

    async def start(self, services: tuple[str, ...], period: float = 0.25) -> None:
        await self.watch(*services)
        self.task = asyncio.get_running_loop().create_task(self._loop(period))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclass
class Replica:
    """One pod: the shop app in ``role`` and its sidecar."""

    role: str
    version: str
    shop: Shop
    server: asyncio.Server
    sidecar: Sidecar

    @property
    def app_port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """What SIGTERM does with the sidecar draining first: leave, drain, then the app."""
        await self.sidecar.stop()
        self.shop.mesh.close()
        self.server.close()
        await self.server.wait_closed()


@dataclass
class Fleet:
    """The replicas of the shop's services in one namespace."""

    namespace: str
    nats_url: str
    mirror: SecretMirror
    replicas: list[Replica] = field(default_factory=list)
    retired: list[Replica] = field(default_factory=list)

    async def start(self, role: str, version: str = "v1", resource: str = "") -> Replica:
        """A new replica of ``role`` (creds of NatsService ``resource``), serving once ready."""
        shop = Shop(role, {"VERSION": version, "NATSMESH_OUTBOUND": "127.0.0.1:1"})
        server = await asyncio.start_server(
            lambda r, w: serve_connection(shop, r, w), "127.0.0.1", 0, backlog=1024
        )
        port = int(server.sockets[0].getsockname()[1])
        sidecar = Sidecar(
            settings(
                role,
                self.namespace,
                self.nats_url,
                port,
                version=version,
                creds_file=str(self.mirror.path(resource or role)),
                ready_period_seconds=0.2,
            ),
            creds_poll=0.2,
            access_log=False,  # a line per hop would cost more CPU than the hops
        )
        await sidecar.start()
        shop.mesh = MeshClient(f"127.0.0.1:{sidecar.outbound_port}")
        replica = Replica(role, version, shop, server, sidecar)
        self.replicas.append(replica)
        await sidecar.wait_ready(within=20)
        return replica

    def of(self, role: str) -> list[Replica]:
        return [r for r in self.replicas if r.role == role]

    async def stop(self, replica: Replica) -> None:
        self.replicas.remove(replica)
        self.retired.append(replica)
        await replica.stop()

    async def rolling_restart(self, role: str, overlap: float = 0.3) -> None:
        """maxSurge 1, maxUnavailable 0: a new replica ready, then an old one terminated
        (``overlap`` seconds later: both serve meanwhile, as when the endpoints catch up)."""
        for old in self.of(role):
            await self.start(role, old.version)
            await asyncio.sleep(overlap)
            await self.stop(old)

    async def close(self) -> None:
        for replica in reversed(list(self.replicas)):
            await self.stop(replica)

    async def take_up(self, role: str, resource: str = "", within: float = 10.0) -> None:
        """Every replica of ``role`` signs with the creds now in its file."""
        path = self.mirror.path(resource or role)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            want = permissions.Creds.read(str(path)).jwt
            if all(r.sidecar.creds and r.sidecar.creds.jwt == want for r in self.of(role)):
                return
            if loop.time() > deadline:
                raise AssertionError(f"{role}'s sidecars did not take up {path} in {within}s")
            await asyncio.sleep(0.05)

    def processed(self, role: str) -> set[str]:
        """Idempotency keys (order ids) of the events ``role``'s replicas processed."""
        out: set[str] = set()
        for r in self.replicas + self.retired:
            if r.role == role:
                out |= set(r.shop.processed)
        return out


@dataclass
class Answer:
    at: float
    latency: float
    status: int
    order_id: str
    detail: str = ""
    version: str = ""
    """The orders version that answered."""


class Traffic:
    """Paced checkouts through the gateway app, every answer kept."""

    def __init__(self, gateway_port: int, rate: float = RATE, workers: int = WORKERS) -> None:
        self.gateway_port = gateway_port
        self.rate = rate
        self.workers = workers
        self.answers: list[Answer] = []
        self.processed_elsewhere: set[str] = set()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.started = 0.0

    async def _checkout(self, client: MeshClient) -> Answer:
        order_id = uuid.uuid4().hex[:16]
        t0 = time.monotonic()
        try:
            status, _, body = await asyncio.wait_for(
                client.call("POST", "gateway", "/checkout", {"item": "book", "order_id": order_id}),
                REQUEST_TIMEOUT,
            )
            detail = "" if status == 200 else str(body)[:300]
            version = str(body.get("orders_version") or "")
        except Exception as exc:
            status, detail, version = 0, repr(exc)[:300], ""
        return Answer(t0, time.monotonic() - t0, status, order_id, detail, version)

    async def _worker(self, index: int) -> None:
        client = MeshClient(f"127.0.0.1:{self.gateway_port}")
        interval = self.workers / self.rate
        next_at = self.started + index * interval / self.workers
        try:
            for _ in range(1_000_000):  # bounded; stopped long before
                if self._stop.is_set():
                    return
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at = max(next_at + interval, time.monotonic() - interval)
                self.answers.append(await self._checkout(client))
        finally:
            client.close()

    def start(self) -> None:
        self.started = time.monotonic()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker(i)) for i in range(self.workers)]

    async def finish(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), REQUEST_TIMEOUT + 5)

    def window(self, start: float, end: float) -> list[Answer]:
        return [a for a in self.answers if start <= a.at < end]


def p99_ms(answers: list[Answer]) -> float:
    if not answers:
        return float("nan")
    lat = sorted(a.latency for a in answers)
    return 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]


@dataclass
class ChangeReport:
    """What a change did to the traffic: counts, failures, p99 beside steady state."""

    name: str
    steady: list[Answer]
    during: list[Answer]
    seconds: float
    lost_events: list[str]

    @property
    def failed(self) -> list[Answer]:
        return [a for a in self.steady + self.during if a.status != 200]

    def summary(self) -> str:
        rate = len(self.during) / (self.seconds + AFTER)
        statuses: dict[int, int] = {}
        for a in self.failed:
            statuses[a.status] = statuses.get(a.status, 0) + 1
        return (
            f"[change] {self.name}: took {self.seconds:.1f}s; {len(self.during)} requests "
            f"({rate:.0f}/s) during it and the {AFTER:.0f}s after, "
            f"{len(self.failed)} failed {statuses}, "
            f"{len(self.lost_events)} events lost; p99 steady {p99_ms(self.steady):.1f} ms, "
            f"during {p99_ms(self.during):.1f} ms"
        )

    def check(self) -> None:
        print(self.summary())
        examples = [f"{a.status} {a.detail}" for a in self.failed[:5]]
        assert not self.failed, f"{self.summary()}\nfirst failures: {examples}"
        assert not self.lost_events, f"{self.summary()}\nlost: {self.lost_events[:5]}"
        assert len(self.during) > 0, "no traffic during the change"


@contextlib.asynccontextmanager
async def under_traffic(
    name: str, fleet: Fleet, events_to: str = "payments", settle: float = 15.0
) -> AsyncIterator[list[ChangeReport]]:
    """Traffic for STEADY seconds, then the body (the change), then every event
    of every answered order must reach ``events_to`` within ``settle`` seconds.
    Yields a list that holds the report once the block is done."""
    (gateway,) = fleet.of("gateway")
    traffic = Traffic(gateway.app_port)
    traffic.start()
    out: list[ChangeReport] = []
    try:
        await asyncio.sleep(STEADY)
        began = time.monotonic()
        yield out
        ended = time.monotonic()
        await asyncio.sleep(AFTER)  # traffic on the changed mesh counts as well
    finally:
        await traffic.finish()
    ordered = {a.order_id for a in traffic.answers if a.status == 200}
    deadline = time.monotonic() + settle
    # The events arrive on the consumers' own schedule: poll, bounded.
    while (missing := ordered - fleet.processed(events_to)) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    out.append(
        ChangeReport(
            name,
            steady=traffic.window(traffic.started, began),
            during=traffic.window(began, time.monotonic()),
            seconds=ended - began,
            lost_events=sorted(missing),
        )
    )
