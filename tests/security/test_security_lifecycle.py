"""Creds that die: expiry, revocation on narrowing, on a lost Secret, on delete.

Against the real API server and the operator process: the attacker copied a
service's creds Secret; the legitimate sidecar (played by a connection made
from the *current* Secret) must keep working. Times from the change to the
old creds being refused are printed for the closing figures.

A narrowing holds the old key's revocation until no connection uses it, at
most the revocation grace (:data:`REVOCATION_GRACE` here): the attacker here
keeps a connection open with the copy, the worst case, so the grace is what
ends it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from nats.aio.client import Client as NATS

from natsmesh_operator.wiring import jwt
from natsmesh_operator.wiring.apply import connect_creds
from natsmesh_operator.wiring.held import HELD_KEY
from natsmesh_operator.wiring.keys import Key, Role
from natsmesh_operator.wiring.users import managed_user_nats
from natsmesh_sidecar import subjects
from tests.fixtures.cluster import nats_service
from tests.fixtures.operator import REVOCATION_GRACE, OperatorProcess, claims

pytestmark = pytest.mark.timeout(180)

SLACK = 15.0
"""Seconds past the grace the revocation may take on a loaded box (a pass,
the account push)."""


@asynccontextmanager
async def holding_open(op: OperatorProcess, creds: str) -> AsyncIterator[NATS]:
    """An attacker's connection with ``creds``, kept open (never reconnects)."""
    nc = await connect_creds(op.nats.url, creds, max_reconnect_attempts=0)
    try:
        yield nc
    finally:
        await nc.close()


async def cut_within(nc: NATS, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not nc.is_closed:
        assert loop.time() < deadline, f"the revoked user's connection still open after {seconds}s"
        await asyncio.sleep(0.1)


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


async def test_narrowing_revokes_the_old_creds_after_a_bounded_grace(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    op, ns = mesh_operator, mesh_namespace
    op.apply(ns, nats_service("b"), nats_service("x"))
    op.wait_ready("natsservice", "b", ns)
    stolen = op.creds(ns, "b")
    assert stolen is not None
    wide = f"{subjects.serve_subject(ns, 'b', 'v1', ns, '*')} b"
    assert wide in claims(stolen)["nats"]["sub"]["allow"]
    assert await op.connects(stolen)
    async with holding_open(op, stolen) as attacker:
        # b stops admitting its namespace: only x may call it now.
        changed = time.monotonic()
        op.apply(ns, nats_service("b", allowSameNamespace=False, allowedCallers=[{"name": "x"}]))
        current = replaced(op, ns, "b", stolen)
        assert claims(current)["sub"] != claims(stolen)["sub"], "a new key"
        assert wide not in claims(current)["nats"]["sub"]["allow"]
        assert await op.connects(current), "the service itself keeps working"
        # The hold is visible, and says until when.
        op.wait_for(
            "b reports the held revocation",
            lambda: (
                op.condition("natsservice", "b", ns, "PreviousCredentialsRevoked").get("reason")
                == "RevocationHeld"
            ),
            REVOCATION_GRACE,
        )
        assert (
            claims(stolen)["sub"]
            in op.condition("natsservice", "b", ns, "PreviousCredentialsRevoked")["message"]
        )
        # The attacker's open connection does not stretch it past the grace:
        # the copy is refused, and the connection cut.
        await op.refused_within(stolen, REVOCATION_GRACE + SLACK)
        refused = time.monotonic() - changed
        print(
            f"narrowing re-issue, a copy kept connected -> old creds refused: {refused:.2f}s "
            f"(grace {REVOCATION_GRACE:.0f}s)"
        )
        await cut_within(attacker, 5)
    assert refused < REVOCATION_GRACE + SLACK
    assert await op.connects(current), "the service itself keeps working"
    op.wait_for(
        "the condition gone once revoked",
        lambda: not op.condition("natsservice", "b", ns, "PreviousCredentialsRevoked"),
        SLACK,
    )
    assert "natsmesh_operator_held_revocations_total" in op.metrics()
    # x's creds were not touched by b's grant change.
    x_before = op.creds(ns, "x")
    assert x_before is not None
    assert await op.connects(x_before)


async def test_a_held_revocation_survives_an_operator_restart(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    """The hold is in the keys Secret before the creds Secret moves: an operator
    killed during it revokes the old key after its restart (a hold kept only in
    memory would never be revoked: nothing else names that key any more)."""
    op, ns = mesh_operator, mesh_namespace
    op.apply(ns, nats_service("h"), nats_service("x"))
    op.wait_ready("natsservice", "h", ns)
    stolen = op.creds(ns, "h")
    assert stolen is not None
    async with holding_open(op, stolen) as attacker:
        changed = time.monotonic()
        op.apply(ns, nats_service("h", allowSameNamespace=False, allowedCallers=[{"name": "x"}]))
        current = replaced(op, ns, "h", stolen)
        await asyncio.to_thread(op.stop, signal.SIGKILL)
        assert await op.connects(stolen), "held: the copy still works while nobody revokes it"
        await asyncio.to_thread(op.start)
        await op.refused_within(stolen, REVOCATION_GRACE + SLACK + 30)
        print(f"held revocation across an operator restart: {time.monotonic() - changed:.2f}s")
        await cut_within(attacker, 5)
    assert await op.connects(current)


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
    await mesh_operator.refused_within(stolen, 30)
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
    await mesh_operator.refused_within(stolen, 30)
    assert await mesh_operator.connects(other)


async def test_a_hold_another_replica_recorded_is_carried_out(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    """A standby that takes over has loaded the keys Secret long before (it
    counts endpoints too); the hold the active replica recorded since is
    carried out all the same: each pass re-reads a Secret someone else wrote."""
    op, ns = mesh_operator, mesh_namespace
    op.apply(ns, nats_service("k"))
    op.wait_ready("natsservice", "k", ns)
    keys = op.get("secret", "natsmesh-keys", op.namespace)["data"]
    account = Key.from_seed(base64.b64decode(keys[f"account.{ns}"]).decode(), Role.ACCOUNT)
    # A key the other replica issued to k and then moved k's Secret off.
    old = Key.create(Role.USER)
    token = jwt.encode({"sub": old.public, "name": f"{ns}/k", "nats": managed_user_nats()}, account)
    copy = jwt.creds(token, old.seed)
    assert await op.connects(copy)
    held = json.loads(base64.b64decode(keys.get(HELD_KEY) or "e30=").decode())
    now = int(time.time())
    held.setdefault(ns, {})[old.public] = {"service": "k", "since": now - 120, "until": now - 30}
    encoded = base64.b64encode(json.dumps(held).encode()).decode()
    op.cluster.kubectl(
        "patch", "secret", "natsmesh-keys", "-n", op.namespace, "--type=merge",
        "-p", json.dumps({"data": {HELD_KEY: encoded}}),
    )  # fmt: skip
    took = await op.refused_within(copy, SLACK)
    print(f"a hold recorded by another replica -> carried out in {took:.2f}s")
    current = op.creds(ns, "k")
    assert current is not None
    assert await op.connects(current), "the service itself keeps working"
