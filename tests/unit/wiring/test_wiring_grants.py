"""Grants name NatsService resources: what an ``allowedCallers`` entry admits in a pass.

``shop/orders`` grants the *resource* ``web/frontend``, which serves the mesh
service ``site``; in ``web`` an attacker's ``evil`` claims the unused
``spec.service: frontend``. Each test plans the whole mesh and checks the
callee's subscriptions, the account export/import, the caller's route table,
the same-namespace target and the problems.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from natsmesh_operator.wiring import grants
from natsmesh_operator.wiring.desired import CallerRef, Publish, ServiceIntent, Subscribe
from natsmesh_operator.wiring.plan import MeshPlan, plan
from natsmesh_sidecar import subjects

pytestmark = pytest.mark.unit

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z"

ORDERS = ServiceIntent(
    "shop",
    "orders",
    allow_same_namespace=False,
    allowed_callers=(CallerRef("frontend", "web"),),
    created=T0,
)
FRONTEND = ServiceIntent("web", "site", resource="frontend", created=T0)
EVIL = ServiceIntent("web", "frontend", resource="evil", created=T1)


def hears(p: MeshPlan, caller: tuple[str, str]) -> bool:
    """Whether orders' user subscribes to calls from ``caller``'s identity."""
    subject = subjects.call_subject(subjects.request_subject("shop", "orders", "v1"), *caller)
    sub = p.user("shop", "orders").permissions.sub_allow
    return any(subjects.subject_matches(e.split(" ")[0], subject) for e in sub)


def imports_orders(p: MeshPlan, caller: tuple[str, str]) -> bool:
    wanted = subjects.import_subject("shop", "orders", *caller)
    return any(i.subject == wanted for i in p.accounts[caller[0]].imports) and any(
        e.subject == wanted for e in p.accounts["shop"].exports
    )


def knows_orders(p: MeshPlan, caller: tuple[str, str]) -> bool:
    return "orders.shop" in p.tables[caller].known


def test_the_grant_admits_the_resource_identity_not_a_service_of_that_name() -> None:
    p = plan([ORDERS, FRONTEND, EVIL])
    assert p.problems == ()
    # The granted resource, as whatever service it serves.
    assert hears(p, ("web", "site"))
    assert imports_orders(p, ("web", "site"))
    assert knows_orders(p, ("web", "site"))
    # The claimant of the name written in the grant: nothing at all.
    assert not hears(p, ("web", "frontend"))
    assert not imports_orders(p, ("web", "frontend"))
    assert not knows_orders(p, ("web", "frontend"))
    assert p.tables[("web", "frontend")].destinations == {}


def test_the_grant_follows_the_resource_when_it_renames_its_service() -> None:
    before = plan([ORDERS, FRONTEND])
    renamed = replace(FRONTEND, name="portal")
    # ...and someone picks up the name it left.
    after = plan([ORDERS, renamed, replace(EVIL, name="site")])
    assert after.problems == ()
    assert hears(after, ("web", "portal"))
    assert imports_orders(after, ("web", "portal"))
    assert knows_orders(after, ("web", "portal"))
    assert not hears(after, ("web", "site"))
    assert not imports_orders(after, ("web", "site"))
    assert not knows_orders(after, ("web", "site"))
    # What orders heard before is gone: a narrowing, so its creds are re-issued
    # (new key) and the old user revoked.
    old, new = before.user("shop", "orders"), after.user("shop", "orders")
    assert new.permissions.narrows(old.permissions)


def test_deleting_the_granted_resource_narrows_the_callee() -> None:
    before = plan([ORDERS, FRONTEND])
    # A version subset keeps web.site alive after frontend goes: it is not
    # the granted resource, so the grant lapses anyway.
    canary = replace(FRONTEND, version="v2", resource="frontend-canary", created=T1)
    with_canary = plan([ORDERS, FRONTEND, canary])
    assert hears(with_canary, ("web", "site"))
    after = plan([ORDERS, canary])
    assert not hears(after, ("web", "site"))
    assert not imports_orders(after, ("web", "site"))
    assert not knows_orders(after, ("web", "site"))
    assert after.user("shop", "orders").permissions.narrows(
        before.user("shop", "orders").permissions
    )
    (problem,) = after.problems
    assert (problem.name, problem.reason, problem.condition) == (
        "orders",
        "UnknownCaller",
        grants.CONDITION,
    )
    assert "web/frontend" in problem.message
    assert "metadata.name" in problem.message


@pytest.mark.parametrize(
    ("granted", "why"),
    [
        # frontend claims site v1 after early did: SubjectConflict, no user.
        (replace(FRONTEND, created=T2), "SubjectConflict"),
        # frontend serves site v2 with another policy than early: no user.
        (
            replace(FRONTEND, version="v2", created=T2, allow_same_namespace=False),
            "InconsistentSubsets",
        ),
    ],
)
def test_a_granted_resource_that_holds_no_user_admits_nobody(
    granted: ServiceIntent, why: str
) -> None:
    # web.site exists (early holds it), but the grant names frontend, which
    # does not hold it: its owner must not get the grant through it.
    early = ServiceIntent("web", "site", resource="early", created=T0)
    p = plan([ORDERS, early, granted])
    assert ("frontend", why) in [(x.name, x.reason) for x in p.problems]
    assert not hears(p, ("web", "site"))
    assert not imports_orders(p, ("web", "site"))
    unknown = p.problems_for("NatsService", "shop", "orders")
    assert [x.reason for x in unknown] == ["UnknownCaller"]


def test_every_version_of_the_callee_gets_the_problem_and_the_resolution() -> None:
    v2 = replace(ORDERS, version="v2", resource="orders-v2", created=T1)
    p = plan([ORDERS, v2, FRONTEND])
    assert p.problems == ()
    for u in p.users:
        if u.namespace == "shop":
            assert f"mesh.shop.orders.{u.version}.web.site orders" in u.permissions.sub_allow
    lapsed = plan([ORDERS, v2])
    assert sorted(x.name for x in lapsed.problems) == ["orders", "orders-v2"]


def test_a_grant_to_a_version_subset_admits_the_service_it_shares() -> None:
    # The identity on the wire is the service, so versions of it are one
    # caller: granting the canary resource admits the whole service.
    canary = replace(FRONTEND, version="v2", resource="frontend-canary", created=T1)
    p = plan(
        [replace(ORDERS, allowed_callers=(CallerRef("frontend-canary", "web"),)), FRONTEND, canary]
    )
    assert p.problems == ()
    assert hears(p, ("web", "site"))


def test_same_namespace_entries_resolve_the_same_way() -> None:
    # gw serves "gateway"; a resource *named* gateway serves something else.
    orders = replace(ORDERS, allowed_callers=(CallerRef("gw"),))
    gw = ServiceIntent("shop", "gateway", resource="gw", created=T0)
    decoy = ServiceIntent("shop", "admin", resource="gateway", created=T0)
    claimant = ServiceIntent("shop", "gw", resource="evil", created=T1)
    p = plan([orders, gw, decoy, claimant])
    assert p.problems == ()
    sub = p.user("shop", "orders").permissions.sub_allow
    assert "mesh.shop.orders.v1.shop.gateway orders" in sub
    assert not any(".shop.gw " in s or ".shop.admin " in s for s in sub)
    # Replies only into the admitted caller's inbox.
    pub = p.user("shop", "orders").permissions.pub_allow
    assert f"{subjects.inbox_prefix('gateway')}.>" in pub
    assert f"{subjects.inbox_prefix('gw')}.>" not in pub
    # What callers in the namespace read from to.orders.
    target = p.targets[("shop", "orders")]
    assert (target.admits_namespace, target.callers) == (False, ("gateway",))
    assert p.accounts["shop"].exports == ()


def test_an_unknown_same_namespace_caller_is_reported_on_every_entry() -> None:
    orders = replace(ORDERS, allowed_callers=(CallerRef("ghost"), CallerRef("frontend", "web")))
    (problem,) = plan([orders]).problems
    assert "shop/ghost" in problem.message
    assert "web/frontend" in problem.message
    assert plan([orders]).targets[("shop", "orders")].callers == ()


def test_a_cross_namespace_subscription_needs_a_grant_to_the_subscribing_resource() -> None:
    orders = replace(ORDERS, publishes=(Publish("order.created"),))
    sub = (Subscribe("order.created", "orders", "/e", namespace="shop"),)
    granted = replace(FRONTEND, subscriptions=sub)
    claimant = replace(EVIL, subscriptions=sub)
    p = plan([orders, granted, claimant])
    assert [c.subscriber for c in p.consumers] == [("web", "site")]
    (problem,) = p.problems
    assert (problem.name, problem.reason) == ("evil", "SubscriptionNotAllowed")
    assert "{name: evil, namespace: web}" in problem.message
