"""Creds that die: expiry, revocation on narrowing, on a lost Secret, on delete.

Against the real API server and the operator process: the attacker copied a
service's creds Secret; the legitimate sidecar (played by a connection made
from the *current* Secret) must keep working. Times from the change to the
old creds being refused are printed for the closing figures.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import pytest

from natsmesh_operator.wiring import jwt
from natsmesh_operator.wiring.apply import connect_creds
from natsmesh_sidecar import subjects
from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.timeout(180)


def nsvc(name: str, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "natsmesh.io/v1alpha1",
            "kind": "NatsService",
            "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"app": name}}, "port": 8080, **spec},
        }
    )


def creds_of(op: OperatorProcess, namespace: str, name: str) -> str | None:
    out = op.cluster.kubectl(
        "get", "secret", f"natsmesh-{name}-creds", "-n", namespace, "-o", "json", check=False
    )
    if out.returncode != 0:
        return None
    data = json.loads(out.stdout).get("data") or {}
    raw = data.get("user.creds")
    return base64.b64decode(raw).decode() if raw else None


def claims(creds: str) -> dict[str, Any]:
    token, _ = jwt.parse_creds(creds)
    return dict(jwt.decode(token, verify_signature=False).claims)


async def connects(op: OperatorProcess, creds: str) -> bool:
    try:
        nc = await connect_creds(op.nats.url, creds, max_reconnect_attempts=0)
    except Exception:
        return False
    await nc.close()
    return True


async def refused_within(op: OperatorProcess, creds: str, seconds: float) -> float:
    """Seconds until ``creds`` can no longer connect."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if not await connects(op, creds):
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise AssertionError(f"old creds still accepted after {seconds}s\n{op.tail()}")


def replaced(op: OperatorProcess, namespace: str, name: str, old: str) -> str:
    """The creds the operator wrote in place of ``old``."""
    op.wait_for(f"{name}'s new creds", lambda: creds_of(op, namespace, name) not in (None, old), 30)
    current = creds_of(op, namespace, name)
    assert current is not None
    return current


def apply(op: OperatorProcess, namespace: str, manifest: str) -> None:
    op.cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)


async def test_every_user_jwt_expires_and_names_its_key_in_status(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    ns = mesh_namespace
    apply(mesh_operator, ns, nsvc("a"))
    mesh_operator.wait_ready("natsservice", "a", ns)
    creds = creds_of(mesh_operator, ns, "a")
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
    apply(mesh_operator, ns, nsvc("b") + "\n---\n" + nsvc("x"))
    mesh_operator.wait_ready("natsservice", "b", ns)
    stolen = creds_of(mesh_operator, ns, "b")
    assert stolen is not None
    wide = f"{subjects.serve_subject(ns, 'b', 'v1', ns, '*')} b"
    assert wide in claims(stolen)["nats"]["sub"]["allow"]
    assert await connects(mesh_operator, stolen)
    # b stops admitting its namespace: only x may call it now.
    changed = time.monotonic()
    apply(mesh_operator, ns, nsvc("b", allowSameNamespace=False, allowedCallers=[{"service": "x"}]))
    took = await refused_within(mesh_operator, stolen, 15)
    print(f"narrowing re-issue -> old creds refused: {time.monotonic() - changed:.2f}s")
    current = replaced(mesh_operator, ns, "b", stolen)
    assert claims(current)["sub"] != claims(stolen)["sub"], "a new key"
    assert wide not in claims(current)["nats"]["sub"]["allow"]
    assert await connects(mesh_operator, current), "the service itself keeps working"
    assert took < 15
    # x's creds were not touched by b's grant change.
    x_before = creds_of(mesh_operator, ns, "x")
    assert x_before is not None
    assert await connects(mesh_operator, x_before)


async def test_a_secret_deleted_by_hand_revokes_the_copy(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    ns = mesh_namespace
    apply(mesh_operator, ns, nsvc("c"))
    mesh_operator.wait_ready("natsservice", "c", ns)
    stolen = creds_of(mesh_operator, ns, "c")
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
    assert await connects(mesh_operator, replaced(mesh_operator, ns, "c", stolen))


async def test_deleting_the_service_revokes_its_user(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    ns = mesh_namespace
    apply(mesh_operator, ns, nsvc("d") + "\n---\n" + nsvc("e"))
    mesh_operator.wait_ready("natsservice", "d", ns)
    mesh_operator.wait_ready("natsservice", "e", ns)
    stolen = creds_of(mesh_operator, ns, "d")
    other = creds_of(mesh_operator, ns, "e")
    assert stolen is not None
    assert other is not None
    mesh_operator.cluster.kubectl("delete", "natsservice", "d", "-n", ns, "--wait=false")
    await refused_within(mesh_operator, stolen, 30)
    assert await connects(mesh_operator, other)
