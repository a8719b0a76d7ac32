"""Two sidecars with real user JWTs on an operator-mode nats-server.

The NATS wiring library plans the shop example (gateway -> orders -> payments),
pushes the account, creates the route KV bucket and writes every service's
table into it; the users' creds are issued from the plan and written to files
the sidecars read, as the mounted Secret would be. No static tables: each
sidecar follows its own KV key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.apply import admin_creds, put_table
from natsmesh_operator.wiring.plan import MeshPlan, plan
from natsmesh_operator.wiring.routes import RouteDestination, RouteIntent, RouteRule
from natsmesh_sidecar import app as sidecar_app
from natsmesh_sidecar import subjects
from natsmesh_sidecar.app import Sidecar
from natsmesh_sidecar.config import Fault, FaultAbort, Match, MeshTable
from natsmesh_sidecar.policy import permissions
from tests.fixtures.nats_operator import OperatorNats, shop_intents
from tests.integration.sidecar.jwt_harness import (
    NS,
    Load,
    applied_shop,
    issue,
    metric,
    wait_for,
    write_creds,
)
from tests.integration.sidecar.sidecar_harness import (
    TestApp,
    destination,
    request,
    settings,
)

pytestmark = pytest.mark.integration


@dataclass
class JwtMesh:
    on: OperatorNats
    plan: MeshPlan
    app: TestApp
    gateway: Sidecar  # the caller
    orders: Sidecar  # in front of the app
    creds: dict[str, Path] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.gateway.outbound_port

    async def apply(self, p: MeshPlan, **kw: object) -> None:
        async with self.on.applier() as a:
            report = await a.apply(p, **kw)  # type: ignore[arg-type]
            assert report.ok, report.errors
        self.plan = p

    async def put_table(self, table: MeshTable) -> None:
        """Write a table the way the operator does, as the account's admin user."""
        nc = await self.on.connect(admin_creds(self.on.keyring.account(NS)))
        try:
            account = self.on.keyring.account(NS)
            await put_table(nc.jetstream(), account, table.service, table.to_json())
        finally:
            await nc.close()


@pytest.fixture
async def jwt_mesh(nats_operator: OperatorNats, tmp_path: Path) -> AsyncIterator[JwtMesh]:
    p, creds = await applied_shop(nats_operator, tmp_path)
    app = await TestApp().start()
    orders = Sidecar(
        settings("orders", NS, nats_operator.url, app.port, creds_file=str(creds["orders"])),
        creds_poll=0.1,
    )
    gateway = Sidecar(
        settings("gateway", NS, nats_operator.url, creds_file=str(creds["gateway"])),
        creds_poll=0.1,
    )
    mesh = JwtMesh(nats_operator, p, app, gateway, orders, creds)
    await orders.start()
    await gateway.start()
    try:
        await orders.wait_ready()
        await gateway.wait_ready()
        want = p.tables[(NS, "gateway")].generation
        await wait_for(
            lambda: gateway.router.table.generation == want, 10, "gateway's table from the KV"
        )
        yield mesh
    finally:
        await gateway.stop()
        await orders.stop()
        await app.stop()


def call(namespace: str, target: str, caller: str) -> str:
    """The subject ``caller`` (of ``namespace``) sends a request for ``target`` on."""
    return subjects.call_subject(subjects.request_subject(namespace, target), namespace, caller)


async def test_allowed_call_succeeds_through_the_servers_permissions(jwt_mesh: JwtMesh) -> None:
    r = await request(jwt_mesh.port, "POST", "/orders", host="orders", body=b"hello")
    assert r.status == 200, r.body
    assert r.header("x-app") == "echo"
    got = jwt_mesh.app.requests[-1]
    assert got.body == b"hello"
    assert got.header("x-request-id") == r.header("x-request-id") or got.header("x-request-id")
    assert jwt_mesh.gateway.permissions.restricted
    assert jwt_mesh.gateway.permissions.can_publish(call(NS, "orders", "gateway"))
    assert (
        metric(
            jwt_mesh.gateway,
            "natsmesh_sidecar_nats_async_errors_total",
            kind="permissions_violation",
        )
        == 0
    )
    assert (
        metric(
            jwt_mesh.orders,
            "natsmesh_sidecar_nats_async_errors_total",
            kind="permissions_violation",
        )
        == 0
    )


async def test_forbidden_destination_is_403_and_a_drifted_table_reaches_nobody(
    jwt_mesh: JwtMesh,
) -> None:
    # The planned table already knows payments is not callable ...
    r = await request(jwt_mesh.port, "GET", "/x", host="payments")
    assert r.status == 403
    assert r.json()["error"] == "forbidden"
    # ... and when a table claims it is (table and JWTs out of step, or a
    # forged table), the server still decides: payments does not subscribe to
    # gateway's calls, so nobody hears it: 503 at once, never the 5 s timeout.
    base = jwt_mesh.plan.tables[(NS, "gateway")]
    drifted = base.model_copy(
        update={
            "destinations": {
                **base.destinations,
                "payments.shop": destination(NS, "payments", timeoutMs=5000),
            },
            "generation": "drifted",
        }
    )
    payments = await jwt_mesh.on.connect(
        issue(jwt_mesh.on, jwt_mesh.plan, "payments").creds,
        inbox_prefix=subjects.inbox_prefix("payments"),
    )
    heard: list[str] = []
    try:
        for subject, queue in subjects.serve_subjects(
            jwt_mesh.plan.user(NS, "payments").permissions.sub_allow,
            subjects.request_subject(NS, "payments"),
        ):

            async def hear(msg: object) -> None:
                heard.append(str(getattr(msg, "subject", "")))

            await payments.subscribe(subject, queue=queue, cb=hear)
        await payments.flush()
        await jwt_mesh.put_table(drifted)
        await wait_for(
            lambda: jwt_mesh.gateway.router.table.generation == "drifted", 5, "the drifted table"
        )
        t0 = time.monotonic()
        r = await request(jwt_mesh.port, "GET", "/x", host="payments")
        assert r.status == 503, r.body
        assert r.json()["error"] == "no_responders"
        assert time.monotonic() - t0 < 1.0
        assert heard == []
    finally:
        await payments.close()


async def test_server_permissions_violation_is_surfaced(
    jwt_mesh: JwtMesh, caplog: pytest.LogCaptureFixture
) -> None:
    """Force a publish the JWT forbids: the server's async error becomes a fast 403,
    an error log line and the metric, never a request left to time out."""
    base = jwt_mesh.plan.tables[(NS, "gateway")]
    drifted = base.model_copy(
        update={
            "destinations": {
                **base.destinations,
                "payments.shop": destination(NS, "payments", timeoutMs=5000),
            },
            "generation": "drifted",
        }
    )
    await jwt_mesh.put_table(drifted)
    await wait_for(
        lambda: jwt_mesh.gateway.router.table.generation == "drifted", 5, "the drifted table"
    )
    # The sidecar's view of its JWT goes stale (as if it read an older, wider
    # one) and it names another caller: the server refuses the publish.
    jwt_mesh.gateway.permissions = permissions.Permissions.allow_all()
    jwt_mesh.gateway.outbound_handler.planner.caller_suffix = subjects.caller_suffix(NS, "orders")
    subject = call(NS, "payments", "orders")
    caplog.set_level(logging.INFO, logger="natsmesh_sidecar")
    t0 = time.monotonic()
    r = await request(jwt_mesh.port, "GET", "/x", host="payments")
    elapsed = time.monotonic() - t0
    assert r.status == 403, r.body
    assert r.json()["error"] == "permission_violation"
    assert elapsed < 2.0  # not the rule's 5 s timeout
    assert (
        metric(
            jwt_mesh.gateway,
            "natsmesh_sidecar_nats_async_errors_total",
            kind="permissions_violation",
        )
        >= 1
    )
    logged = [
        rec
        for rec in caplog.records
        if rec.levelno >= logging.ERROR and "permissions violation" in rec.getMessage().lower()
    ]
    assert logged
    assert subject in logged[0].getMessage()
    # Learned: the next call is refused before it is sent.
    before = metric(
        jwt_mesh.gateway, "natsmesh_sidecar_nats_async_errors_total", kind="permissions_violation"
    )
    r = await request(jwt_mesh.port, "GET", "/x", host="payments")
    assert r.status == 403
    await asyncio.sleep(0.2)
    after = metric(
        jwt_mesh.gateway, "natsmesh_sidecar_nats_async_errors_total", kind="permissions_violation"
    )
    assert after == before
    # And with its own identity back, the allowed destination is unaffected.
    jwt_mesh.gateway.outbound_handler.planner.caller_suffix = subjects.caller_suffix(NS, "gateway")
    r = await request(jwt_mesh.port, "GET", "/ok", host="orders")
    assert r.status == 200


async def test_route_table_change_in_kv_is_hot_applied_without_dropping_requests(
    jwt_mesh: JwtMesh,
) -> None:
    chaos = RouteIntent(
        NS,
        "orders",
        rules=(
            RouteRule(
                name="chaos",
                destinations=(RouteDestination("v1"),),
                match=Match(path_prefix="/chaos"),
                fault=Fault(abort=FaultAbort(status=418, percent=100)),
            ),
        ),
    )
    new_plan = plan(shop_intents(NS), [chaos])
    assert not new_plan.problems
    # The route changes orders' Target key, read by every caller of the namespace.
    want = new_plan.targets[(NS, "orders")].generation
    assert want != jwt_mesh.plan.targets[(NS, "orders")].generation
    assert (await request(jwt_mesh.port, "GET", "/chaos/1", host="orders")).status == 200

    load = Load(jwt_mesh.port)
    load.start()
    await asyncio.sleep(0.3)
    targets = jwt_mesh.gateway.targets
    assert targets is not None
    await jwt_mesh.apply(new_plan)  # the Applier writes the changed KV values
    await wait_for(
        lambda: getattr(targets.found.get("orders"), "generation", "") == want, 5, "the new target"
    )
    r = await request(jwt_mesh.port, "GET", "/chaos/1", host="orders")
    assert r.status == 418
    assert r.json()["error"] == "fault_injected"
    await asyncio.sleep(0.3)
    await load.finish()
    # Not one request of the steady load was dropped or failed across the swap.
    assert load.statuses() == {200: len(load.results)}
    assert len(load.results) > 50


async def drained_to_one(mesh: JwtMesh, name: str) -> str:
    """The user of the sidecar's one connection, once a renewal has drained the old."""
    for _ in range(100):
        try:
            return connected_user(mesh, name)
        except AssertionError:
            await asyncio.sleep(0.05)
    return connected_user(mesh, name)


def connected_user(mesh: JwtMesh, name: str) -> str:
    url = f"{mesh.on.server.monitor_url}/connz?auth=1&limit=1024"
    with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310
        connz = json.load(r)
    users_seen = [
        c.get("authorized_user", "") for c in connz["connections"] if c.get("name") == name
    ]
    assert len(users_seen) == 1, users_seen
    return str(users_seen[0])


async def test_renewed_creds_are_taken_up_without_a_failed_request(jwt_mesh: JwtMesh) -> None:
    """The operator renews a JWT (same key, later expiry) well before it
    expires: the sidecar opens a connection with it, moves to it and drains
    the old one; the calls running meanwhile, both ways, all succeed."""
    ring = jwt_mesh.on.keyring
    load = Load(jwt_mesh.port)
    load.start()
    await asyncio.sleep(0.3)
    for svc in ("gateway", "orders"):
        sidecar = getattr(jwt_mesh, svc)
        before = metric(sidecar, "natsmesh_sidecar_creds_renewals_total")
        renewed = users.issue(
            jwt_mesh.plan.user(NS, svc),
            ring.account(NS),
            user_key=ring.user(NS, svc),
            ttl_seconds=7200,
        )
        write_creds(jwt_mesh.creds[svc], renewed.creds)
        await wait_for(
            lambda s=sidecar, b=before: metric(s, "natsmesh_sidecar_creds_renewals_total") > b,
            5,
            f"{svc} taking up its renewed creds",
        )
        await asyncio.sleep(0.3)
    await load.finish()
    failed = [(t, s, b) for t, s, b in load.results if s != 200]
    assert not failed, failed
    assert len(load.results) > 50
    assert metric(jwt_mesh.gateway, "natsmesh_sidecar_nats_reconnects_total") == 0
    # Exactly one connection each is left, on the new JWT.
    name = f"natsmesh-sidecar gateway.{NS}"
    assert await drained_to_one(jwt_mesh, name) == ring.user(NS, "gateway").public


async def test_creds_reload_reconnects_with_the_reissued_jwt(jwt_mesh: JwtMesh) -> None:
    """Rotate gateway's user (new key, new JWT), then revoke the old key: the
    sidecar must be on the new one by then and serve throughout, with at most a
    short, bounded window of fast 503s while it reconnects."""
    ring = jwt_mesh.on.keyring
    name = f"natsmesh-sidecar gateway.{NS}"
    old_key, new_key = ring.rotate_user(NS, "gateway")
    assert old_key is not None
    assert connected_user(jwt_mesh, name) == old_key.public
    renewals = metric(jwt_mesh.gateway, "natsmesh_sidecar_creds_renewals_total")

    load = Load(jwt_mesh.port)
    load.start()
    await asyncio.sleep(0.3)
    reissued = users.issue(jwt_mesh.plan.user(NS, "gateway"), ring.account(NS), user_key=new_key)
    write_creds(jwt_mesh.creds["gateway"], reissued.creds)
    await wait_for(
        lambda: metric(jwt_mesh.gateway, "natsmesh_sidecar_creds_renewals_total") > renewals,
        5,
        "the move to the new creds",
    )
    await wait_for(jwt_mesh.gateway.ready, 5, "ready again")
    assert await drained_to_one(jwt_mesh, name) == new_key.public
    # The old key is now useless to anyone; the sidecar is not affected.
    await jwt_mesh.apply(jwt_mesh.plan, revocations={NS: {old_key.public: int(time.time())}})
    await asyncio.sleep(0.5)
    await load.finish()

    statuses = load.statuses()
    assert set(statuses) <= {200, 503}, statuses
    failed = [(t, body) for t, s, body in load.results if s == 503]
    for _, body in failed:
        assert json.loads(body)["error"] in ("nats_unavailable", "no_responders")
    if failed:
        window = failed[-1][0] - failed[0][0]
        assert window < 2.0, f"503s for {window:.2f}s"
    # Served before, and keeps serving after the rotation and the revocation.
    assert statuses[200] > 50
    assert all(s == 200 for _, s, _ in load.results[-10:])
    r = await request(jwt_mesh.port, "GET", "/after", host="orders")
    assert r.status == 200
    assert jwt_mesh.gateway.permissions.can_publish(call(NS, "orders", "gateway"))


async def test_creds_the_server_refuses_leave_the_current_connection_serving(
    jwt_mesh: JwtMesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New creds the server refuses (here: a key revoked as soon as issued)
    are not taken up: the connect with them gives up within seconds instead
    of retrying forever, the current connection keeps serving every call, and
    the next good creds written are taken up as usual."""
    # The bound of a take-up's connect (5 s), shorter for the test's sake.
    monkeypatch.setattr(sidecar_app, "MOVE_CONNECT_SECONDS", 1.0)
    ring = jwt_mesh.on.keyring
    name = f"natsmesh-sidecar gateway.{NS}"
    gateway = jwt_mesh.gateway
    old_key, refused_key = ring.rotate_user(NS, "gateway")
    assert old_key is not None
    in_use = gateway.creds
    assert in_use is not None
    await asyncio.sleep(1.1)  # a JWT's iat is in seconds: the refused one's is later
    refused = users.issue(jwt_mesh.plan.user(NS, "gateway"), ring.account(NS), user_key=refused_key)
    await jwt_mesh.apply(
        jwt_mesh.plan, revocations={NS: {refused_key.public: int(time.time()) + 1}}
    )
    renewals = metric(gateway, "natsmesh_sidecar_creds_renewals_total")
    failures = metric(gateway, "natsmesh_sidecar_creds_renewal_failures_total")

    load = Load(jwt_mesh.port)
    load.start()
    await asyncio.sleep(0.3)
    write_creds(jwt_mesh.creds["gateway"], refused.creds)
    await wait_for(
        lambda: metric(gateway, "natsmesh_sidecar_creds_renewal_failures_total") > failures,
        10,
        "the refused take-up to give up",
    )
    assert metric(gateway, "natsmesh_sidecar_creds_renewals_total") == renewals
    assert connected_user(jwt_mesh, name) == old_key.public
    # Read but not in use: the next connect signs with them, while the grant,
    # the permissions and the metrics stay those of the connection serving.
    issued = metric(gateway, "natsmesh_sidecar_creds_issued_timestamp_seconds")
    assert issued == in_use.issued, (issued, in_use.issued)
    assert gateway.creds is in_use
    assert gateway.permissions is in_use.permissions
    signing = gateway.signing_creds
    assert signing is not None
    assert signing.jwt == refused.jwt

    # The operator's next creds for the key in use: taken up, make before break.
    good = users.issue(jwt_mesh.plan.user(NS, "gateway"), ring.account(NS), user_key=old_key)
    write_creds(jwt_mesh.creds["gateway"], good.creds)
    await wait_for(
        lambda: metric(gateway, "natsmesh_sidecar_creds_renewals_total") > renewals,
        10,
        "the good creds taken up",
    )
    assert gateway.creds is gateway.signing_creds
    assert gateway.creds is not None
    assert gateway.creds.jwt != in_use.jwt
    assert metric(gateway, "natsmesh_sidecar_creds_issued_timestamp_seconds") > in_use.issued
    await asyncio.sleep(0.3)
    await load.finish()
    failed = [(t, s, b) for t, s, b in load.results if s != 200]
    assert not failed, failed[:5]
    assert len(load.results) > 50
    assert await drained_to_one(jwt_mesh, name) == old_key.public
