"""The NATS operator root stays offline: accounts are signed by a signing key.

Against a real operator-mode nats-server started from ``natsmesh bootstrap``:
accounts the operator signs with its signing key are accepted and their users
connect; an account JWT forged with a key the operator JWT does not list is
refused (a new account, and an overwrite of an existing one), and so is a
claims-delete request signed by such a key. After ``rotate-signing-key`` and a
server restart, accounts signed by the removed key no longer let anyone in
and a push or delete signed by it is refused, while the operator's next
apply with the new key restores every account. With the real operator
process and API server: neither the Secrets in the operator's namespace nor
its environment hold the root seed, and it still makes working creds.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import replace
from pathlib import Path

import pytest

from natsmesh_operator.wiring import bootstrap, jwt
from natsmesh_operator.wiring.accounts import delete_request_claims, limits_claims
from natsmesh_operator.wiring.apply import CLAIMS_DELETE, Applier, _request, admin_creds
from natsmesh_operator.wiring.keys import Key, Role
from natsmesh_operator.wiring.plan import plan
from tests.fixtures.cluster import nats_service
from tests.fixtures.nats_operator import OperatorNats, shop_intents
from tests.fixtures.nats_server import NatsServer
from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.timeout(120)


async def connects(on: OperatorNats, account: Key) -> bool:
    try:
        nc = await on.connect(admin_creds(account), max_reconnect_attempts=0, connect_timeout=2)
    except Exception:
        return False
    try:
        await nc.flush(timeout=2)
    finally:
        await nc.close()
    return True


async def push(on: OperatorNats, token: str) -> None:
    """``$SYS.REQ.CLAIMS.UPDATE`` as the system user (what the operator does).

    The full resolver *stores* whatever the system user sends ("jwt updated");
    trust is checked when the server uses an account, which is what the
    tests observe.
    """
    async with on.applier() as a:
        await a.push_account(token)


async def lookup(on: OperatorNats, account: Key) -> str | None:
    async with on.applier() as a:
        return await a.lookup_account(account.public)


async def delete_as(on: OperatorNats, signer: Key, account: str) -> dict[str, object]:
    token = jwt.encode(delete_request_claims(signer.public, [account]), signer)
    nc = await on.system()
    try:
        return await _request(nc, CLAIMS_DELETE, token.encode(), 5.0)
    finally:
        await nc.close()


def plain_account(account: Key, signer: Key) -> str:
    """An account JWT (no JetStream) for ``account``, signed by ``signer``."""
    return jwt.encode(
        {
            "sub": account.public,
            "name": "plain",
            "nats": {"type": "account", "version": 2, "limits": limits_claims(None)},
        },
        signer,
    )


async def apply_shop(on: OperatorNats, signer: Key | None = None) -> list[str]:
    applier = on.applier()
    if signer is not None:
        applier = Applier(
            url=on.url, signer=signer, system_creds=on.boot.system_user_creds, keyring=on.keyring
        )
    async with applier as a:
        report = await a.apply(plan(shop_intents()))
    assert report.ok, report.errors
    return report.accounts_pushed


async def test_accounts_are_signed_by_the_signing_key_and_forgeries_refused(
    nats_operator: OperatorNats,
) -> None:
    on = nats_operator
    assert on.boot.root is not None
    assert await apply_shop(on) == ["shop"]
    shop = on.keyring.account("shop")
    stored = await lookup(on, shop)
    assert stored is not None
    assert jwt.decode(stored).issuer == on.boot.signing_key.public != on.boot.root.public
    assert await connects(on, shop)  # the legitimate account works
    ours = Key.create(Role.ACCOUNT)
    await push(on, plain_account(ours, on.boot.signing_key))
    assert await connects(on, ours)

    # Attack: an account of the attacker's own, signed by a key it made up.
    rogue, mine = Key.create(Role.OPERATOR), Key.create(Role.ACCOUNT)
    await push(on, plain_account(mine, rogue))
    assert not await connects(on, mine)
    # Attack: overwrite the shop account (say, to drop its limits and
    # revocations). The server keeps serving the genuine claims...
    await push(on, plain_account(shop, rogue))
    assert await connects(on, shop)
    # ...and the operator's next pass puts the genuine JWT back in the store.
    assert await apply_shop(on) == ["shop"]
    restored = await lookup(on, shop)
    assert restored is not None
    assert jwt.decode(restored).issuer == on.boot.signing_key.public
    # Attack: delete the shop account with a request self-signed by the rogue key.
    answer = await delete_as(on, rogue, shop.public)
    assert "error" in answer, answer
    assert await lookup(on, shop) is not None
    assert await connects(on, shop)
    # The operator's own signing key may delete (what pruning does).
    answer = await delete_as(on, on.boot.signing_key, ours.public)
    assert "error" not in answer, answer
    assert await lookup(on, ours) is None


async def test_a_rotated_out_signing_key_is_refused(nats_operator: OperatorNats) -> None:
    on = nats_operator
    assert on.boot.root is not None
    assert await apply_shop(on) == ["shop"]
    shop = on.keyring.account("shop")
    old = on.boot.signing_key
    # An account only the old key ever signed (nobody re-signs it).
    stale = Key.create(Role.ACCOUNT)
    await push(on, plain_account(stale, old))
    assert await connects(on, stale)

    # rotate-signing-key: the Secret gets the new key and operator JWT; the
    # operator's next pass re-signs every account (their issuer differs) and
    # the servers store them; then the servers restart with the new operator JWT.
    on.boot = bootstrap.rotate_signing_key(replace(on.boot, root=None), on.boot.root)
    assert await apply_shop(on) == ["shop"]
    assert isinstance(on.server, NatsServer)
    on.server.extra_config = on.boot.auth_conf()
    on.restart()

    assert await connects(on, shop)  # signed by the new key: accepted
    assert not await connects(on, stale)  # signed by the removed key: refused
    # Attack: whoever stole the old key signs a new account, or deletes one.
    mine = Key.create(Role.ACCOUNT)
    await push(on, plain_account(mine, old))
    assert not await connects(on, mine)
    answer = await delete_as(on, old, shop.public)
    assert "error" in answer, answer
    assert await connects(on, shop)
    # The legitimate counterpart: the new key signs accounts that work.
    theirs = Key.create(Role.ACCOUNT)
    await push(on, plain_account(theirs, on.boot.signing_key))
    assert await connects(on, theirs)
    assert await apply_shop(on) == []  # nothing left to re-sign


def test_the_operator_never_holds_the_root(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    op, ns = mesh_operator, mesh_namespace
    root = op.nats.boot.root
    assert root is not None
    # It still does its job: a NatsService gets creds that NATS accepts.
    op.cluster.kubectl("apply", "-n", ns, "-f", "-", input=nats_service("orders"))
    op.wait_ready("natsservice", "orders", ns)
    creds = base64.b64decode(
        op.get("secret", "natsmesh-orders-creds", ns)["data"]["user.creds"]
    ).decode()
    asyncio.run(_connect_once(op.nats, creds))

    listed = json.loads(
        op.cluster.kubectl("get", "secrets", "-n", op.namespace, "-o", "json").stdout
    )["items"]
    data = {
        item["metadata"]["name"]: {
            k: base64.b64decode(v).decode(errors="replace")
            for k, v in (item.get("data") or {}).items()
        }
        for item in listed
    }
    # The bootstrap Secret it reads: the same trust root, a signer, no root.
    boot = bootstrap.Bootstrap.from_files(data["natsmesh-nats-bootstrap"])
    assert boot.operator_public == root.public
    assert boot.signing_key == op.nats.boot.signing_key
    assert boot.root is None
    # No Secret in its namespace holds the root seed, under any name.
    assert all(root.seed not in v for d in data.values() for v in d.values())
    assert op.proc is not None
    environ = Path(f"/proc/{op.proc.pid}/environ").read_bytes().decode(errors="replace")
    assert "NATSMESH_NATS_URL" in environ
    assert root.seed not in environ


async def _connect_once(on: OperatorNats, creds: str) -> None:
    nc = await on.connect(creds, max_reconnect_attempts=0, connect_timeout=2)
    try:
        await nc.flush(timeout=2)
    finally:
        await nc.close()


def test_a_bootstrap_from_before_signing_keys_keeps_working(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    """An existing install's Secret (operator.nk, no signing.nk): the operator
    signs with that root as before, warns, and generates nothing."""
    op, ns = mesh_operator, mesh_namespace
    root = op.nats.boot.root
    assert root is not None
    name = "natsmesh-nats-bootstrap"
    current = op.nats.boot.files()
    legacy = {k: v for k, v in current.items() if k != "signing.nk"}
    legacy["operator.nk"] = root.seed + "\n"

    def put(files: dict[str, str]) -> None:
        op.cluster.kubectl("delete", "secret", name, "-n", op.namespace, "--ignore-not-found")
        manifest = bootstrap.secret_manifest(files, name, op.namespace)
        op.cluster.kubectl("apply", "-f", "-", input=manifest)

    put(legacy)
    try:
        op.cluster.kubectl("apply", "-n", ns, "-f", "-", input=nats_service("legacy"))
        op.wait_ready("natsservice", "legacy", ns, timeout=60)
        creds = base64.b64decode(
            op.get("secret", "natsmesh-legacy-creds", ns)["data"]["user.creds"]
        ).decode()
        asyncio.run(_connect_once(op.nats, creds))
        user_jwt, _ = jwt.parse_creds(creds)
        account = jwt.decode(user_jwt).issuer

        async def issuer() -> str:
            async with op.nats.applier() as a:
                token = await a.lookup_account(account)
            assert token is not None
            return jwt.decode(token).issuer

        # Signed by the legacy root (a pass that read the Secret just before the
        # swap may have used the signing key; the next one re-signs).
        op.wait_for("the account signed by the root", lambda: asyncio.run(issuer()) == root.public)
        assert "holds the NATS operator root key and no signing key" in op.tail(200_000)
        # Generated nothing: the Secret is as the admin left it.
        data = op.get("secret", name, op.namespace)["data"]
        assert sorted(data) == sorted(legacy)
    finally:
        put(current)
