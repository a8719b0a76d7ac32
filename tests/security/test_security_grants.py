"""Grants name a NatsService resource, not a service name (issue 12, item 2).

Namespace A's ``orders`` admits ``{namespace: B, name: frontend}``. In B the
resource ``frontend`` serves ``spec.service: web``, and the attacker, who may
create NatsServices in B, makes ``evil`` with ``spec.service: frontend``: the
name written in the grant, unused in B, so first-claimant ownership does not
refuse it. Before, that inherited the grant. Against the real API server, the
operator process and its operator-mode nats-server, with the creds the
operator wrote:

* evil calls A's orders as itself -> no responders (nothing imported, nobody
  listens), and cannot name web (the server refuses the publish);
  frontend's creds, beside it, are answered;
* frontend renames its service to ``site``: the grant moves with it, and a
  newcomer claiming the freed ``web`` gets nothing;
* frontend is deleted: the grant lapses, so even a live version subset of
  its service (same identity on the wire) is no longer answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager

import nats
import pytest
from nats.aio.msg import Msg

from natsmesh_sidecar import subjects
from tests.fixtures.cluster import nats_service
from tests.fixtures.nats_operator import Probe, call
from tests.fixtures.operator import REVOCATION_GRACE, OperatorProcess, claims, operator_namespace

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def caller_namespace(mesh_operator: OperatorProcess) -> Iterator[str]:
    with operator_namespace(mesh_operator) as name:
        yield name


def current_creds(op: OperatorProcess, namespace: str, resource: str) -> str:
    creds = op.creds(namespace, resource)
    assert creds is not None, f"no creds for {namespace}/{resource}\n{op.tail()}"
    return creds


def sub_allow(creds: str) -> tuple[str, ...]:
    return tuple(claims(creds)["nats"]["sub"]["allow"])


def hears(op: OperatorProcess, a: str, b: str, caller: str) -> bool:
    """Whether orders' current creds subscribe to calls from ``<b>.<caller>``."""
    creds = op.creds(a, "orders")
    entry = f"{subjects.serve_subject(a, 'orders', 'v1', b, caller)} orders"
    return creds is not None and entry in sub_allow(creds)


@asynccontextmanager
async def connected(
    op: OperatorProcess, a: str, b: str, *callers: tuple[str, str]
) -> AsyncIterator[list[Probe]]:
    """orders' sidecar, played from its current Secret (serving what its JWT
    allows), and one connection per ``(resource, service)`` of B, from theirs."""
    async with AsyncExitStack() as stack:
        creds = current_creds(op, a, "orders")
        orders = await Probe.connect(op.nats, creds, "orders")
        stack.push_async_callback(orders.close)

        async def answer(msg: Msg) -> None:
            await msg.respond(b"orders")

        base = subjects.request_subject(a, "orders")
        for subject, queue in subjects.serve_subjects(sub_allow(creds), base):
            await orders.nc.subscribe(subject, queue=queue, cb=answer)
        await orders.nc.flush()
        probes = []
        for resource, service in callers:
            probe = await Probe.connect(op.nats, current_creds(op, b, resource), service)
            stack.push_async_callback(probe.close)
            probes.append(probe)
        yield probes


async def answered(probe: Probe, subject: str, within: float = 10.0) -> bool:
    """A call is answered (retried briefly: the importer's account may trail the creds)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            return (await probe.nc.request(subject, b"", timeout=2)).data == b"orders"
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.3)


async def not_answered(probe: Probe, subject: str) -> None:
    with pytest.raises(nats.errors.NoRespondersError):
        await probe.nc.request(subject, b"", timeout=2)


async def test_a_grant_admits_the_named_resource_wherever_its_service_name_goes(
    mesh_operator: OperatorProcess, mesh_namespace: str, caller_namespace: str
) -> None:
    op, a, b = mesh_operator, mesh_namespace, caller_namespace
    grant = {"name": "frontend", "namespace": b}
    op.apply(a, nats_service("orders", allowSameNamespace=False, allowedCallers=[grant]))
    op.apply(b, nats_service("frontend", service="web"), nats_service("evil", service="frontend"))
    for ns, name in ((a, "orders"), (b, "frontend"), (b, "evil")):
        op.wait_ready("natsservice", name, ns)
    op.wait_for("orders hears b.web", lambda: hears(op, a, b, "web"))
    assert not hears(op, a, b, "frontend")
    assert "CallersResolved" not in {
        c["type"] for c in op.get("natsservice", "orders", a)["status"]["conditions"]
    }

    # --- the claimant of the granted name gets nothing; the granted resource does
    async with connected(op, a, b, ("frontend", "web"), ("evil", "frontend")) as (web, evil):
        assert await answered(web, call(a, "orders", b, "web"))
        await not_answered(evil, call(a, "orders", b, "frontend"))
        forged = call(a, "orders", b, "web")
        await evil.nc.publish(forged, b"", reply=evil.nc.new_inbox())
        await evil.nc.flush()
        await evil.violation("publish", forged)
        assert not web.errors

    # --- frontend renames its service: the grant goes with it
    old_web = current_creds(op, b, "frontend")
    op.apply(b, nats_service("frontend", service="site"))
    took = op.wait_for("orders hears b.site", lambda: hears(op, a, b, "site"), 45)
    print(f"rename -> orders' creds follow the resource: {took:.2f}s")
    assert not hears(op, a, b, "web")
    op.wait_for("frontend's creds as site", lambda: op.creds(b, "frontend") != old_web, 30)
    # ...and a newcomer picks up the freed name.
    op.apply(b, nats_service("newcomer", service="web"))
    op.wait_ready("natsservice", "newcomer", b)
    async with connected(op, a, b, ("frontend", "site"), ("newcomer", "web")) as (site, newcomer):
        assert await answered(site, call(a, "orders", b, "site"))
        await not_answered(newcomer, call(a, "orders", b, "web"))
    # The old identity's creds are revoked (held until nothing uses them, bounded).
    await op.refused_within(old_web, REVOCATION_GRACE + 15)

    # --- frontend goes: the grant lapses, even for a live subset of its service
    op.apply(b, nats_service("frontend-canary", service="site", version="v2"))
    op.wait_ready("natsservice", "frontend-canary", b)
    async with connected(op, a, b, ("frontend-canary", "site")) as (canary,):
        # Versions share the identity on the wire, so while frontend exists
        # its canary is admitted too (see docs/security.md).
        assert await answered(canary, call(a, "orders", b, "site"))
    orders_user = op.get("natsservice", "orders", a)["status"]["user"]
    old_orders = current_creds(op, a, "orders")
    op.cluster.kubectl("delete", "natsservice", "frontend", "-n", b, "--timeout=30s")
    took = op.wait_for("orders no longer hears b.site", lambda: not hears(op, a, b, "site"), 45)
    print(f"delete -> orders' creds narrowed: {took:.2f}s")
    # A narrowing: orders got a new key, the old one is revoked.
    op.wait_for(
        "orders re-issued",
        lambda: op.get("natsservice", "orders", a)["status"].get("user") != orders_user,
    )
    op.wait_for(
        "orders reports the lapsed grant",
        lambda: (
            op.condition("natsservice", "orders", a, "CallersResolved").get("reason")
            == "UnknownCaller"
        ),
    )
    # orders' old user, which heard b.site, is revoked.
    await op.refused_within(old_orders, REVOCATION_GRACE + 15)
    op.wait_ready("natsservice", "orders", a)
    async with connected(op, a, b, ("frontend-canary", "site")) as (canary,):
        await not_answered(canary, call(a, "orders", b, "site"))


def test_a_grant_by_service_name_is_refused_and_a_stale_one_is_warned_about(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    op, ns, kubectl = mesh_operator, mesh_namespace, mesh_operator.cluster.kubectl
    op.apply(ns, nats_service("web-frontend", service="frontend"))
    # The old field: the API server says what to write instead.
    old = nats_service("orders", allowedCallers=[{"service": "frontend"}])
    refused = kubectl("apply", "-n", ns, "-f", "-", input=old, check=False)
    assert refused.returncode != 0
    assert "spec.allowedCallers[0].service" in refused.stderr
    assert "write name: <its metadata.name> instead" in refused.stderr
    # A name that is a spec.service here, not a resource: admitted (a caller
    # may come later), with the webhook's hint at the resource serving it.
    stale = nats_service("orders", allowedCallers=[{"name": "frontend"}])
    warned = kubectl("apply", "-n", ns, "-f", "-", input=stale)
    assert "no NatsService 'frontend' in this namespace yet" in warned.stderr
    assert "write name: web-frontend" in warned.stderr
    # ...and, after the pass, the condition says the entry admits nobody.
    op.wait_for(
        "orders reports the entry",
        lambda: (
            op.condition("natsservice", "orders", ns, "CallersResolved").get("reason")
            == "UnknownCaller"
        ),
    )
    assert op.condition("natsservice", "orders", ns)["status"] == "True"
    fixed = nats_service("orders", allowedCallers=[{"name": "web-frontend"}])
    assert "Warning" not in kubectl("apply", "-n", ns, "-f", "-", input=fixed).stderr
    op.wait_for(
        "the condition gone",
        lambda: not op.condition("natsservice", "orders", ns, "CallersResolved"),
    )
