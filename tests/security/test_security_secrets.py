"""A Secret labelled as creds cannot stop the control plane or revoke anyone.

A tenant who may create Secrets in its own namespace labels some
``natsmesh.io/creds=true``: one with bytes that are not UTF-8, one with
creds whose JWT names a victim's user key but is signed by the tenant's own
key (a forged ``sub``), two of ~700 KB each (aimed at the size of the
operator's keys Secret), and an exact copy of the victim's real creds under
a name no live service has, owned by the victim and carrying the operator's
annotation. Against the real API server and the real operator process:
a new NatsService still becomes Ready, the victim's creds still connect to
NATS, the keys Secret stays small, and a legitimate deletion still revokes
the deleted service's user.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import nats
import pytest

from natsmesh_operator.handlers.kube import ANNOTATION_ISSUED_USER
from natsmesh_operator.wiring import jwt
from natsmesh_operator.wiring.keys import Key, Role
from tests.fixtures.cluster import nats_service
from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.timeout(180)


def creds_of(op: OperatorProcess, name: str, ns: str) -> str:
    data = op.get("secret", f"natsmesh-{name}-creds", ns)["data"]["user.creds"]
    return base64.b64decode(data).decode()


def secret(
    name: str,
    data: dict[str, bytes],
    *,
    annotations: dict[str, str] | None = None,
    owner: dict[str, Any] | None = None,
    resource: str | None = None,
) -> str:
    labels = {"natsmesh.io/creds": "true"}
    if resource:
        labels["natsmesh.io/resource"] = resource
    meta: dict[str, Any] = {"name": name, "labels": labels, "annotations": annotations or {}}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta,
            "type": "Opaque",
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        }
    )


def forged_creds(sub: str, *, padding: int = 0) -> bytes:
    """Creds with a JWT for ``sub`` signed by a key of the attacker's own."""
    attacker = Key.create(Role.ACCOUNT)
    user = Key.create(Role.USER)
    claims = {"sub": sub, "name": "x" * padding or "forged", "nats": {"type": "user", "version": 2}}
    return jwt.creds(jwt.encode(claims, attacker), user.seed).encode()


async def connects(url: str, creds: str, tmp: Path) -> bool:
    path = tmp / f"c{abs(hash(creds))}.creds"
    path.write_text(creds)
    try:
        nc = await nats.connect(
            url,
            user_credentials=str(path),
            allow_reconnect=False,
            max_reconnect_attempts=1,
            connect_timeout=2,
        )
    except Exception:
        return False
    await nc.close()
    return True


async def test_poisoned_secrets_neither_stop_the_pass_nor_revoke_anyone(
    mesh_operator: OperatorProcess, mesh_namespace: str, tmp_path: Path
) -> None:
    op, ns, kubectl = mesh_operator, mesh_namespace, mesh_operator.cluster.kubectl
    kubectl("apply", "-n", ns, "-f", "-", input=nats_service("victim"))
    op.wait_ready("natsservice", "victim", ns)
    victim_creds = creds_of(op, "victim", ns)
    victim_user = jwt.decode(jwt.parse_creds(victim_creds)[0]).subject
    victim_uid = op.get("natsservice", "victim", ns)["metadata"]["uid"]
    owner = {
        "apiVersion": "natsmesh.io/v1alpha1",
        "kind": "NatsService",
        "name": "victim",
        "uid": victim_uid,
        "controller": True,
    }
    poison = [
        secret("poison-binary", {"user.creds": b"\xff\xfe\x00\x80 not utf-8", "x": b"\xc3\x28"}),
        secret(
            "poison-forged-sub",
            {"user.creds": forged_creds(victim_user)},
            annotations={ANNOTATION_ISSUED_USER: victim_user},
            owner=owner,
            resource="ghost",
        ),
        secret("poison-big-1", {"user.creds": forged_creds("U" * 700_000)}),
        secret("poison-big-2", {"user.creds": forged_creds(victim_user, padding=700_000)}),
        # The real thing, copied under a name no live service has.
        secret(
            "natsmesh-ghost-creds",
            {"user.creds": victim_creds.encode()},
            annotations={ANNOTATION_ISSUED_USER: victim_user},
            owner=owner,
            resource="ghost",
        ),
    ]
    for manifest in poison:
        kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=manifest)

    # The mesh keeps working: a new service becomes Ready through the poison.
    kubectl("apply", "-n", ns, "-f", "-", input=nats_service("orders"))
    op.wait_ready("natsservice", "orders", ns, timeout=60)
    # Several passes over the poison (the drift loop asks for one every 2 s here).
    await asyncio.sleep(5)
    assert op.condition("natsservice", "victim", ns)["status"] == "True"
    assert await connects(op.nats.url, victim_creds, tmp_path), "the victim was revoked"
    health = json.loads(_get(op, "/healthz"))
    assert health["status"] == "ok", health
    keys = op.get("secret", "natsmesh-keys", op.namespace)["data"]
    assert sum(len(v) for v in keys.values()) < 64 * 1024
    # Not ours, so not deleted either: the operator only removes what it made.
    # The copy of real creds under a dead name is provably ours: removed, but
    # the user in it stays valid, since a live service holds it.
    names = kubectl("get", "secrets", "-n", ns, "-o", "name").stdout
    assert "secret/poison-binary" in names
    assert "secret/poison-forged-sub" in names
    assert "secret/natsmesh-ghost-creds" not in names

    # Beside it, revocation still does its job for a real deletion.
    orders_creds = creds_of(op, "orders", ns)
    assert await connects(op.nats.url, orders_creds, tmp_path)
    kubectl("delete", "natsservice", "orders", "-n", ns, "--timeout=60s")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while await connects(op.nats.url, orders_creds, tmp_path):
        assert loop.time() < deadline, "the deleted service's user was not revoked"
        await asyncio.sleep(0.5)
    assert await connects(op.nats.url, victim_creds, tmp_path)


def _get(op: OperatorProcess, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}{path}", timeout=5) as r:
        return str(r.read().decode())
