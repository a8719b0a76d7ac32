"""Status follows the truth within 2 s: endpoints, a deleted creds Secret, dropped versions.

The operator here has drift and endpoint timers of five minutes, so nothing
in these tests can be the timers' doing: only the events (NATS connect and
disconnect advisories, the creds Secret watch) can make the 2 s. The
sidecars are real (in-process ``Sidecar``s) and connect with the creds the
operator wrote into the service's Secret, as a mounted Secret would give
them.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from lightkube import AsyncClient
from nats.aio.client import Client as NATS

from natsmesh_operator.handlers.kube import NatsServiceRes, body_of
from natsmesh_operator.wiring.apply import admin_creds, connect_creds
from natsmesh_operator.wiring.keys import Key, Role
from natsmesh_sidecar import subjects
from natsmesh_sidecar.app import Sidecar
from tests.fixtures.cluster import Cluster
from tests.fixtures.operator import OperatorProcess, kube_client, operator_namespace, start_operator
from tests.integration.sidecar.sidecar_harness import TestApp, settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

WITHIN = 2.0
SLOW_TIMERS = 300.0
SYNC_SETTLE = 1.5
"""Seconds for the operator to open a new namespace's stream watch (it looks every 1 s)."""

ORDERS = """
apiVersion: natsmesh.io/v1alpha1
kind: NatsService
metadata:
  name: {name}
spec:
  service: orders
  version: {version}
  selector:
    matchLabels:
      app: orders
      version: {version}
  port: 8080
  allowedCallers: [{callers}]
  events:
    publishes:
      - topic: order.created
"""

ROUTE = """
apiVersion: natsmesh.io/v1alpha1
kind: NatsRoute
metadata:
  name: orders
spec:
  service: orders
  rules:
    - name: testers
      match:
        headers:
          x-canary: "always"
      destinations:
        - version: v2
          weight: 100
    - name: canary
      destinations:
        - version: v1
          weight: 90
        - version: v2
          weight: 10
"""


@pytest.fixture(scope="module")
def event_operator(
    crds: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """An operator whose timers are too slow to matter within a test."""
    with start_operator(
        crds,
        tmp_path_factory.mktemp("fresh"),
        drift_interval=SLOW_TIMERS,
        endpoints_interval=SLOW_TIMERS,
    ) as op:
        yield op


@pytest.fixture
def namespace(event_operator: OperatorProcess) -> Iterator[str]:
    with operator_namespace(event_operator) as name:
        yield name


@pytest.fixture
async def kube(event_operator: OperatorProcess) -> AsyncIterator[AsyncClient]:
    async with kube_client(event_operator) as client:
        yield client


@pytest.fixture
async def app() -> AsyncIterator[TestApp]:
    served = await TestApp().start()
    try:
        yield served
    finally:
        await served.stop()


def apply_orders(
    op: OperatorProcess,
    namespace: str,
    name: str = "orders",
    version: str = "v1",
    callers: str = "",
) -> None:
    manifest = ORDERS.format(name=name, version=version, callers=callers)
    op.cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)


def creds_file(op: OperatorProcess, namespace: str, name: str, path: Path) -> Path:
    """The service's creds as the kubelet would mount them (atomically replaced)."""
    secret = op.get("secret", f"natsmesh-{name}-creds", namespace)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(base64.b64decode(secret["data"]["user.creds"]))
    os.replace(tmp, path)
    return path


async def until(
    op: OperatorProcess, what: str, check: Callable[[], Awaitable[object]], within: float
) -> float:
    """Poll ``check()`` until it returns True; the seconds that took."""
    started = time.monotonic()
    while True:
        last = await check()
        elapsed = time.monotonic() - started
        if last is True:
            return elapsed
        if elapsed > within:
            raise AssertionError(f"{what}: not within {within}s (last: {last!r})\n{op.tail()}")
        await asyncio.sleep(0.05)


def endpoints_are(
    kube: AsyncClient, namespace: str, want: int, name: str = "orders"
) -> Callable[[], Awaitable[object]]:
    """A check of ``status.endpoints`` through the API (no kubectl process per poll)."""

    async def check() -> object:
        obj = await kube.get(NatsServiceRes, name, namespace=namespace)
        got = (body_of(obj).get("status") or {}).get("endpoints")
        return True if got == want else got

    return check


def metric(op: OperatorProcess, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", op.metrics(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def start_sidecar(op: OperatorProcess, namespace: str, creds: Path, app: TestApp) -> Sidecar:
    sidecar = Sidecar(
        settings("orders", namespace, op.nats.url, app.port, creds_file=str(creds)),
        creds_poll=0.1,
    )
    await sidecar.start()
    await sidecar.wait_ready()
    return sidecar


async def orders_ready(
    op: OperatorProcess, kube: AsyncClient, namespace: str, tmp_path: Path
) -> Path:
    """orders applied, Ready, counted at 0; its creds file for sidecars."""
    apply_orders(op, namespace)
    await asyncio.to_thread(op.wait_ready, "natsservice", "orders", namespace)
    await until(op, "endpoints 0 after Ready", endpoints_are(kube, namespace, 0), WITHIN)
    return creds_file(op, namespace, "orders", tmp_path / "orders.creds")


async def test_endpoints_follow_sidecars_connecting_and_disconnecting(
    event_operator: OperatorProcess,
    namespace: str,
    app: TestApp,
    kube: AsyncClient,
    tmp_path: Path,
) -> None:
    op, ns = event_operator, namespace
    creds = await orders_ready(op, kube, ns, tmp_path)
    lags: dict[str, float] = {}
    first = await start_sidecar(op, ns, creds, app)
    lags["0->1"] = await until(op, "endpoints 1", endpoints_are(kube, ns, 1), WITHIN)
    second = await start_sidecar(op, ns, creds, app)
    lags["1->2"] = await until(op, "endpoints 2", endpoints_are(kube, ns, 2), WITHIN)
    await first.stop()
    lags["2->1"] = await until(op, "endpoints 1 again", endpoints_are(kube, ns, 1), WITHIN)
    await second.stop()
    lags["1->0"] = await until(op, "endpoints 0 again", endpoints_are(kube, ns, 0), WITHIN)
    print(f"endpoint lags (s, polled every 50 ms): {lags}")


async def test_a_burst_of_sidecars_is_counted_in_few_status_writes(
    event_operator: OperatorProcess,
    namespace: str,
    app: TestApp,
    kube: AsyncClient,
    tmp_path: Path,
) -> None:
    op, ns = event_operator, namespace
    creds = await orders_ready(op, kube, ns, tmp_path)
    writes = metric(op, "natsmesh_operator_endpoint_writes_total")
    sidecars = await asyncio.gather(*(start_sidecar(op, ns, creds, app) for _ in range(8)))
    try:
        lag = await until(op, "endpoints 8", endpoints_are(kube, ns, 8), WITHIN)
        await asyncio.sleep(1.5)  # the follow-up counts too
        written = metric(op, "natsmesh_operator_endpoint_writes_total") - writes
        print(f"8 sidecars: counted in {lag:.2f}s with {written:g} status writes")
        # A write per coalesced count that changed something (one count per 0.3 s at most): not 8.
        assert 1 <= written <= 4, written
    finally:
        await asyncio.gather(*(s.stop() for s in sidecars))
    await until(op, "endpoints 0 after the burst", endpoints_are(kube, ns, 0), WITHIN)


async def test_a_recreated_service_counts_its_serving_sidecar_within_2s(
    event_operator: OperatorProcess,
    namespace: str,
    app: TestApp,
    kube: AsyncClient,
    tmp_path: Path,
) -> None:
    op, ns = event_operator, namespace
    creds = await orders_ready(op, kube, ns, tmp_path)
    sidecar = await start_sidecar(op, ns, creds, app)
    try:
        await until(op, "endpoints 1", endpoints_are(kube, ns, 1), WITHIN)
        # Deleted (its user revoked: the sidecar is cut off) and created again.
        await asyncio.to_thread(
            op.cluster.kubectl, "delete", "natsservice", "orders", "-n", ns, "--timeout=30s"
        )
        apply_orders(op, ns)
        await asyncio.to_thread(op.wait_ready, "natsservice", "orders", ns)
        # The kubelet updates the mounted Secret; the sidecar takes the new creds up.
        creds_file(op, ns, "orders", creds)
        lag = await until(op, "endpoints 1 after re-creation", endpoints_are(kube, ns, 1), WITHIN)
        print(f"re-created service: its sidecar counted {lag:.2f}s after the new creds")
    finally:
        await sidecar.stop()


def test_a_deleted_creds_secret_is_back_within_2s(
    event_operator: OperatorProcess, namespace: str
) -> None:
    op, ns = event_operator, namespace
    apply_orders(op, ns)
    op.wait_ready("natsservice", "orders", ns)
    before = op.get("secret", "natsmesh-orders-creds", ns)["metadata"]["uid"]
    op.cluster.kubectl("delete", "secret", "natsmesh-orders-creds", "-n", ns)

    def back() -> bool:
        got = op.cluster.kubectl(
            "get",
            "secret",
            "natsmesh-orders-creds",
            "-n",
            ns,
            "-o",
            "jsonpath={.metadata.uid}",
            check=False,
        )
        return got.returncode == 0 and got.stdout.strip() not in ("", before)

    lag = op.wait_for("the creds Secret re-issued", back, timeout=WITHIN, interval=0.05)
    print(f"creds Secret back after {lag:.2f}s")
    op.wait_ready("natsservice", "orders", ns)


async def as_account_admin(op: OperatorProcess, namespace: str) -> NATS:
    keys = await asyncio.to_thread(op.get, "secret", "natsmesh-keys", op.namespace)
    seed = base64.b64decode(keys["data"][f"account.{namespace}"]).decode()
    return await connect_creds(op.nats.url, admin_creds(Key.from_seed(seed, Role.ACCOUNT)))


async def streams_of(op: OperatorProcess, namespace: str) -> list[str]:
    nc = await as_account_admin(op, namespace)
    try:
        return [str(i.config.name) for i in await nc.jetstream().streams_info()]
    finally:
        await nc.close()


async def test_a_deleted_stream_is_back_within_2s(
    event_operator: OperatorProcess, namespace: str
) -> None:
    op, ns = event_operator, namespace
    apply_orders(op, ns)
    await asyncio.to_thread(op.wait_ready, "natsservice", "orders", ns)
    stream = subjects.stream_name("orders")
    assert stream in await streams_of(op, ns)
    await asyncio.sleep(SYNC_SETTLE)  # the namespace's watch is up
    nc = await as_account_admin(op, ns)
    try:
        await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()
    started = time.monotonic()
    while stream not in await streams_of(op, ns):
        assert time.monotonic() - started < WITHIN, f"{stream} not back within {WITHIN}s"
        await asyncio.sleep(0.05)
    print(f"stream back after {time.monotonic() - started:.2f}s")


def test_a_route_to_an_inconsistent_canary_says_what_it_dropped(
    event_operator: OperatorProcess, namespace: str
) -> None:
    op, ns = event_operator, namespace
    apply_orders(op, ns, callers="{name: gateway}")
    # The first-created version sets the policy, by creation time (1 s
    # resolution, then uid): v2 must be created in a later second than v1.
    op.wait_ready("natsservice", "orders", ns)
    time.sleep(1.1)
    # v2 admits other callers than v1: the plan leaves it out.
    apply_orders(op, ns, name="orders-v2", version="v2")
    op.cluster.kubectl("apply", "-n", ns, "-f", "-", input=ROUTE)
    op.wait_ready("natsservice", "orders-v2", ns, status="False")
    assert op.condition("natsservice", "orders-v2", ns)["reason"] == "InconsistentSubsets"
    op.wait_for(
        "the route naming its dropped version",
        lambda: op.condition("natsroute", "orders", ns).get("reason") == "VersionsDropped",
        timeout=10,
    )
    ready = op.condition("natsroute", "orders", ns)
    assert ready["status"] == "False"
    assert "v2 (NatsService orders-v2 is InconsistentSubsets)" in ready["message"], ready
    assert "rule(s) 'testers' dropped" in ready["message"], ready
    # What kubectl get shows: not Ready.
    row = op.cluster.kubectl("get", "nroute", "orders", "-n", ns, "--no-headers").stdout.split()
    assert row[:4] == ["orders", "orders", "2", "False"], row
    # v2 made consistent again: the route is whole and Ready.
    apply_orders(op, ns, name="orders-v2", version="v2", callers="{name: gateway}")
    op.wait_ready("natsroute", "orders", ns, timeout=10)
    assert op.condition("natsroute", "orders", ns)["reason"] == "Compiled"
