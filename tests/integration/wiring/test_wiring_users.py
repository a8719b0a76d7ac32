"""User credentials: expiry, rotation with revocation, creds format."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.aio.msg import Msg

from natsmesh_operator.wiring import jwt, users
from natsmesh_operator.wiring.held import user_connections
from natsmesh_operator.wiring.plan import plan
from tests.fixtures.nats_operator import OperatorNats, Probe, serve_as, shop_intents

pytestmark = pytest.mark.integration


async def test_expired_user_is_refused(nats_operator: OperatorNats) -> None:
    p = plan(shop_intents())
    async with nats_operator.applier() as a:
        await a.apply(p)
    account = nats_operator.keyring.account("shop")
    issued = users.issue(p.user("shop", "orders"), account, ttl_seconds=2)
    assert jwt.decode(issued.jwt).expires == jwt.decode(issued.jwt).claims["iat"] + 2
    nc = await nats_operator.connect(issued.creds)
    assert nc.is_connected
    await nc.close()
    await asyncio.sleep(3.1)
    with pytest.raises(Exception, match=r"[Aa]uthori|[Ee]xpired"):
        await nats_operator.connect(issued.creds)
    assert users.needs_reissue(
        issued.creds, p.user("shop", "orders"), account.public, ttl_seconds=2
    )


async def test_rotation_reissues_and_revokes_the_old_key(nats_operator: OperatorNats) -> None:
    p = plan(shop_intents())
    ring = nats_operator.keyring
    account = ring.account("shop")
    user = p.user("shop", "payments")
    async with nats_operator.applier() as a:
        await a.apply(p)
        old = users.issue(user, account, user_key=ring.user("shop", "payments"))
        probe = await Probe.connect(nats_operator, old.creds, "payments")
        await probe.close()
        # Rotate: a new key, a new JWT; the old key is revoked in the account.
        await asyncio.sleep(1.1)  # revocation is "issued at or before": let a second pass
        old_key, new_key = ring.rotate_user("shop", "payments")
        assert old_key is not None
        assert old_key.public == old.public != new_key.public
        new = users.issue(user, account, user_key=new_key)
        report = await a.apply(p, revocations={"shop": {old.public: int(time.time()) - 1}})
        assert report.accounts_pushed == ["shop"]
    fresh = await Probe.connect(nats_operator, new.creds, "payments")

    async def reply(msg: Msg) -> None:
        await msg.respond(b"ok")

    await serve_as(fresh.nc, p, "shop", "payments", reply)
    await fresh.close()
    with pytest.raises(Exception, match=r"[Aa]uthori"):
        await nats_operator.connect(old.creds)


async def test_connections_of_a_user_key_are_counted_by_the_servers(
    nats_operator: OperatorNats,
) -> None:
    """What ends a held revocation: the servers' CONNZ, filtered by account and key."""
    p = plan(shop_intents())
    ring = nats_operator.keyring
    account = ring.account("shop")
    async with nats_operator.applier() as a:
        await a.apply(p)
    orders = users.issue(p.user("shop", "orders"), account)
    payments = users.issue(p.user("shop", "payments"), account)
    first = await Probe.connect(nats_operator, orders.creds, "orders")
    second = await Probe.connect(nats_operator, orders.creds, "orders")
    other = await Probe.connect(nats_operator, payments.creds, "payments")
    wanted = [(account.public, orders.public), (account.public, payments.public)]
    unused = users.issue(p.user("shop", "orders"), account)
    system = await nats_operator.system()
    try:
        counts = await user_connections(system, [*wanted, (account.public, unused.public)])
        assert counts == {
            (account.public, orders.public): 2,
            (account.public, payments.public): 1,
            (account.public, unused.public): 0,
        }
        await first.close()
        await other.close()
        after = {(account.public, orders.public): 1, (account.public, payments.public): 0}
        # The server drops a closed client a moment after the client is done.
        for _ in range(20):
            if (counts := await user_connections(system, wanted)) == after:
                break
            await asyncio.sleep(0.1)
        assert counts == after
    finally:
        await second.close()
        await system.close()
