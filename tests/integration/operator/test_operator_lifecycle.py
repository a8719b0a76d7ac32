"""Deletion cleans NATS up, drift is repaired, restarts converge, outages are reported."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from pathlib import Path

import pytest

from natsmesh_operator.wiring.apply import admin_creds, connect_creds
from natsmesh_operator.wiring.keys import Key, Role
from natsmesh_sidecar import subjects
from tests.fixtures.operator import OperatorProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SHOP = Path(__file__).resolve().parents[3] / "examples" / "shop"


def account_of(op: OperatorProcess, namespace: str) -> str:
    keys = op.get("secret", "natsmesh-keys", op.namespace)["data"]
    seed = base64.b64decode(keys[f"account.{namespace}"]).decode()
    return Key.from_seed(seed, Role.ACCOUNT).public


async def account_exists(op: OperatorProcess, account: str) -> bool:
    nc = await op.nats.system()
    try:
        msg = await nc.request(f"$SYS.REQ.ACCOUNT.{account}.CLAIMS.LOOKUP", b"", timeout=2)
        return bool(msg.data) and not msg.data.startswith(b"{")
    finally:
        await nc.close()


async def streams_and_consumers(op: OperatorProcess, namespace: str) -> dict[str, list[str]]:
    seed = base64.b64decode(
        op.get("secret", "natsmesh-keys", op.namespace)["data"][f"account.{namespace}"]
    ).decode()
    nc = await connect_creds(op.nats.url, admin_creds(Key.from_seed(seed, Role.ACCOUNT)))
    try:
        js = nc.jetstream()
        out: dict[str, list[str]] = {}
        for info in await js.streams_info():
            name = str(info.config.name)
            out[name] = [c.name for c in await js.consumers_info(name)]
        return out
    finally:
        await nc.close()


def secret_exists(op: OperatorProcess, name: str, namespace: str) -> bool:
    return op.cluster.kubectl("get", "secret", name, "-n", namespace, check=False).returncode == 0


def ready_all(op: OperatorProcess, namespace: str) -> None:
    for name in ("gateway", "orders", "orders-v2", "payments", "inventory"):
        op.wait_ready("natsservice", name, namespace)


async def test_deleting_a_service_removes_user_secret_and_consumers(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    op, ns = mesh_operator, mesh_namespace
    op.cluster.kubectl("apply", "-n", ns, "-f", str(SHOP))
    ready_all(op, ns)
    before = await streams_and_consumers(op, ns)
    assert any("inventory" in c for cs in before.values() for c in cs), before
    creds = base64.b64decode(
        op.get("secret", "natsmesh-inventory-creds", ns)["data"]["user.creds"]
    ).decode()
    op.cluster.kubectl("delete", "natsservice", "inventory", "-n", ns, "--timeout=30s")
    # The finalizer was released (the delete returned), the Secret is gone...
    op.wait_for(
        "the creds Secret gone", lambda: not secret_exists(op, "natsmesh-inventory-creds", ns)
    )
    after = await streams_and_consumers(op, ns)
    assert not any("inventory" in c for cs in after.values() for c in cs), after
    assert "EVENTS_orders" in after, "other services' streams stay"
    # ...and the user is revoked: its creds no longer connect.
    with pytest.raises(Exception, match=r"(?i)authorization|revoked"):
        await connect_creds(op.nats.url, creds)


async def test_deleting_the_namespace_leaves_nothing_in_nats(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    op, ns = mesh_operator, mesh_namespace
    op.cluster.kubectl("apply", "-n", ns, "-f", str(SHOP))
    ready_all(op, ns)
    account = account_of(op, ns)
    assert await account_exists(op, account)
    op.cluster.kubectl("delete", "natsservices,natsroutes", "--all", "-n", ns, "--timeout=60s")

    async def gone() -> bool:
        return not await account_exists(op, account)

    for _ in range(50):
        if await gone():
            break
        await asyncio.sleep(0.2)
    assert await gone()


async def test_drift_is_repaired(mesh_operator: OperatorProcess, mesh_namespace: str) -> None:
    op, ns = mesh_operator, mesh_namespace
    op.cluster.kubectl("apply", "-n", ns, "-f", str(SHOP))
    ready_all(op, ns)
    op.cluster.kubectl("delete", "secret", "natsmesh-payments-creds", "-n", ns)
    seed = base64.b64decode(
        op.get("secret", "natsmesh-keys", op.namespace)["data"][f"account.{ns}"]
    ).decode()
    nc = await connect_creds(op.nats.url, admin_creds(Key.from_seed(seed, Role.ACCOUNT)))
    try:
        await nc.jetstream().delete_stream(subjects.stream_name("payments"))
    finally:
        await nc.close()
    op.wait_for(
        "the creds Secret back",
        lambda: secret_exists(op, "natsmesh-payments-creds", ns),
        timeout=20,
    )
    for _ in range(100):
        if subjects.stream_name("payments") in await streams_and_consumers(op, ns):
            break
        await asyncio.sleep(0.2)
    assert subjects.stream_name("payments") in await streams_and_consumers(op, ns)


def test_killed_operator_converges_after_restart(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    op, ns = mesh_operator, mesh_namespace
    op.cluster.kubectl("apply", "-n", ns, "-f", str(SHOP))
    # Kill it mid-reconcile: right after the apply, before everything is Ready.
    op.stop(signal.SIGKILL)
    op.start()
    ready_all(op, ns)
    secrets = json.loads(
        op.cluster.kubectl(
            "get", "secrets", "-n", ns, "-l", "natsmesh.io/creds=true", "-o", "json"
        ).stdout
    )["items"]
    assert sorted(s["metadata"]["name"] for s in secrets) == sorted(
        f"natsmesh-{n}-creds" for n in ("gateway", "orders", "orders-v2", "payments", "inventory")
    )
    # A second restart changes nothing: no Secret is re-issued.
    versions = {s["metadata"]["name"]: s["metadata"]["resourceVersion"] for s in secrets}
    op.restart()
    ready_all(op, ns)
    again = json.loads(
        op.cluster.kubectl(
            "get", "secrets", "-n", ns, "-l", "natsmesh.io/creds=true", "-o", "json"
        ).stdout
    )["items"]
    assert {s["metadata"]["name"]: s["metadata"]["resourceVersion"] for s in again} == versions


def test_nats_outage_is_reported_and_recovers(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    op, ns = mesh_operator, mesh_namespace
    op.cluster.kubectl("apply", "-n", ns, "-f", str(SHOP / "gateway.yaml"))
    op.wait_ready("natsservice", "gateway", ns)
    op.nats.server.stop()
    try:
        op.wait_ready("natsservice", "gateway", ns, status="False", timeout=30)
        cond = op.condition("natsservice", "gateway", ns)
        assert cond["reason"] == "NatsUnavailable"
        assert op.nats.url in cond["message"]
    finally:
        op.nats.server.start()
    op.wait_ready("natsservice", "gateway", ns, status="True", timeout=30)


def test_metrics_count_reconciles_and_admissions(mesh_operator: OperatorProcess) -> None:
    text = mesh_operator.metrics()
    assert 'natsmesh_operator_mesh_passes_total{result="ok"}' in text
    assert "natsmesh_operator_managed_objects" in text
    assert "natsmesh_operator_webhook_duration_seconds_bucket" in text
