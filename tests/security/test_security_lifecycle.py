"""Creds that die: expiry, revocation on narrowing, on a lost Secret, on delete.

Against the real API server and the operator process: the attacker copied a
service's creds Secret; the legitimate sidecar (played by a connection made
from the *current* Secret) must keep working. Times from the change to the
old creds being refused are printed for the closing figures.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from natsmesh_sidecar import subjects
from tests.fixtures.cluster import nats_service
from tests.fixtures.operator import OperatorProcess, claims

pytestmark = pytest.mark.timeout(180)


async def refused_within(op: OperatorProcess, creds: str, seconds: float) -> float:
    """Seconds until ``creds`` can no longer connect."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if not await op.connects(creds):
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise AssertionError(f"old creds still accepted after {seconds}s\n{op.tail()}")


def replaced(op: OperatorProcess, namespace: str, name: str, old: str) -> str:
    """The creds the operator wrote in place of ``old``."""
    op.wait_for(f"{name}'s new creds", lambda: op.creds(namespace, name) not in (None, old), 30)
    current = op.creds(namespace, name)
    assert current is not None
    return current


async def test_every_user_jwt_expires_and_names_its_key_in_status(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    ns = mesh_namespace
    mesh_operator.apply(ns, nats_service("a"))
    mesh_operator.wait_ready("natsservice", "a", ns)
    creds = mesh_operator.creds(ns, "a")
    assert creds is not None
    c = claims(creds)
    assert 23 * 3600 < c["exp"] - c["iat"] <= 24 * 3600
    assert "resp" not in c["nats"]
    status = mesh_operator.get("natsservice", "a", ns)["status"]
    assert status["user"] == c["sub"]
    assert status["credentialsExpire"].endswith("Z")


async def test_narrowing_revokes_the_old_creds_at_once(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    ns = mesh_namespace
    mesh_operator.apply(ns, nats_service("b"), nats_service("x"))
    mesh_operator.wait_ready("natsservice", "b", ns)
    stolen = mesh_operator.creds(ns, "b")
    assert stolen is not None
    wide = f"{subjects.serve_subject(ns, 'b', 'v1', ns, '*')} b"
    assert wide in claims(stolen)["nats"]["sub"]["allow"]
    assert await mesh_operator.connects(stolen)
    # b stops admitting its namespace: only x may call it now.
    changed = time.monotonic()
    mesh_operator.apply(
        ns, nats_service("b", allowSameNamespace=False, allowedCallers=[{"name": "x"}])
    )
    took = await refused_within(mesh_operator, stolen, 15)
    print(f"narrowing re-issue -> old creds refused: {time.monotonic() - changed:.2f}s")
    current = replaced(mesh_operator, ns, "b", stolen)
    assert claims(current)["sub"] != claims(stolen)["sub"], "a new key"
    assert wide not in claims(current)["nats"]["sub"]["allow"]
    assert await mesh_operator.connects(current), "the service itself keeps working"
    assert took < 15
    # x's creds were not touched by b's grant change.
    x_before = mesh_operator.creds(ns, "x")
    assert x_before is not None
    assert await mesh_operator.connects(x_before)


async def test_a_secret_deleted_by_hand_revokes_the_copy(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    ns = mesh_namespace
    mesh_operator.apply(ns, nats_service("c"))
    mesh_operator.wait_ready("natsservice", "c", ns)
    stolen = mesh_operator.creds(ns, "c")
    assert stolen is not None
    mesh_operator.wait_for(
        "status.user",
        lambda: (
            mesh_operator.get("natsservice", "c", ns).get("status", {}).get("user")
            == claims(stolen)["sub"]
        ),
    )
    mesh_operator.cluster.kubectl("delete", "secret", "natsmesh-c-creds", "-n", ns)
    await refused_within(mesh_operator, stolen, 30)
    assert await mesh_operator.connects(replaced(mesh_operator, ns, "c", stolen))


async def test_deleting_the_service_revokes_its_user(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    ns = mesh_namespace
    mesh_operator.apply(ns, nats_service("d"), nats_service("e"))
    mesh_operator.wait_ready("natsservice", "d", ns)
    mesh_operator.wait_ready("natsservice", "e", ns)
    stolen = mesh_operator.creds(ns, "d")
    other = mesh_operator.creds(ns, "e")
    assert stolen is not None
    assert other is not None
    mesh_operator.cluster.kubectl("delete", "natsservice", "d", "-n", ns, "--wait=false")
    await refused_within(mesh_operator, stolen, 30)
    assert await mesh_operator.connects(other)
