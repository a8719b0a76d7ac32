"""Status conditions follow the API conventions and only move when something changed."""

from __future__ import annotations

from natsmesh_operator.handlers import status
from natsmesh_operator.handlers.mesh import CredsOutcome, PassResult
from natsmesh_operator.wiring.desired import CallerRef, ServiceIntent
from natsmesh_operator.wiring.held import Held
from natsmesh_operator.wiring.keys import Key, Role
from natsmesh_operator.wiring.plan import plan
from natsmesh_operator.wiring.routes import RouteDestination, RouteIntent, RouteRule

OLD = "2026-01-01T00:00:00Z"


def test_transition_time_kept_while_status_unchanged() -> None:
    previous = [{"type": "Ready", "status": "True", "lastTransitionTime": OLD}]
    merged = status.merge(previous, [status.Cond("Ready", True, "Reconciled", "ok")], 3)
    assert merged[0]["lastTransitionTime"] == OLD
    assert merged[0]["observedGeneration"] == 3
    flipped = status.merge(previous, [status.Cond("Ready", False, "NatsUnavailable", "down")], 3)
    assert flipped[0]["lastTransitionTime"] != OLD
    assert flipped[0]["status"] == "False"


def test_fatal_pass_marks_every_condition_false_with_the_cause() -> None:
    result = PassResult(started=0.0, fatal="NATS unreachable at nats://x:4222: refused")
    conds = status.service_conditions(result, "shop", "orders")
    assert [c.type for c in conds] == ["CredentialsReady", "StreamsReady", "RoutesReady", "Ready"]
    assert all(not c.ok and c.reason == "NatsUnavailable" for c in conds)
    assert "nats://x:4222" in conds[-1].message
    route = status.route_conditions(result, "shop", "orders")
    assert route[0].reason == "NatsUnavailable"


def test_unchanged_conditions_compare_equal() -> None:
    a = status.merge([], [status.Cond("Ready", True, "Reconciled", "ok")], 1)
    b = status.merge(a, [status.Cond("Ready", True, "Reconciled", "ok")], 1)
    assert status._same(a, b)
    c = status.merge(a, [status.Cond("Ready", True, "Reconciled", "other")], 1)
    assert not status._same(a, c)


def test_a_network_policy_failure_fails_only_its_service() -> None:
    result = PassResult(
        started=0.0,
        plan=plan([ServiceIntent("shop", "orders"), ServiceIntent("shop", "web")]),
        creds={
            ("shop", "orders"): CredsOutcome(True, "CredentialsIssued", "ok"),
            ("shop", "web"): CredsOutcome(True, "CredentialsIssued", "ok"),
        },
        policy_errors={("shop", "orders"): "forbidden"},
    )
    orders = {c.type: c for c in status.service_conditions(result, "shop", "orders")}
    assert not orders["NetworkPolicyReady"].ok
    assert (orders["Ready"].ok, orders["Ready"].reason) == (False, "NetworkPolicyFailed")
    web = {c.type: c for c in status.service_conditions(result, "shop", "web")}
    assert "NetworkPolicyReady" not in web
    assert web["Ready"].ok


def test_a_grant_that_admits_nobody_is_its_own_condition_not_ready_false() -> None:
    ghost = ServiceIntent("shop", "orders", allowed_callers=(CallerRef("frontend", "web"),))
    ok = CredsOutcome(True, "CredentialsIssued", "ok")
    result = PassResult(started=0.0, plan=plan([ghost]), creds={("shop", "orders"): ok})
    conds = {c.type: c for c in status.service_conditions(result, "shop", "orders")}
    callers = conds["CallersResolved"]
    assert (callers.ok, callers.reason) == (False, "UnknownCaller")
    assert "web/frontend" in callers.message
    # The service itself works: a caller may come later.
    assert conds["Ready"].ok
    # Once the named resource exists, the condition goes (shown only while failing).
    resolved = plan([ghost, ServiceIntent("web", "site", resource="frontend")])
    result = PassResult(started=0.0, plan=resolved, creds={("shop", "orders"): ok})
    assert "CallersResolved" not in {
        c.type for c in status.service_conditions(result, "shop", "orders")
    }


def test_a_route_that_dropped_a_version_is_not_ready_and_says_which() -> None:
    v1 = ServiceIntent("shop", "orders", "v1")
    v2 = ServiceIntent("shop", "orders", "v2", allow_same_namespace=False, resource="orders-v2")
    route = RouteIntent(
        "shop", "orders", (RouteRule((RouteDestination("v1", 90), RouteDestination("v2", 10))),)
    )
    result = PassResult(started=0.0, plan=plan([v1, v2], [route]))
    (ready,) = status.route_conditions(result, "shop", "orders")
    assert (ready.type, ready.ok, ready.reason) == ("Ready", False, "VersionsDropped")
    assert "v2 (NatsService orders-v2 is InconsistentSubsets)" in ready.message


def test_a_held_revocation_is_its_own_condition_and_says_until_when() -> None:
    ok = CredsOutcome(True, "CredentialsIssued", "ok")
    mesh = plan([ServiceIntent("shop", "orders"), ServiceIntent("shop", "web")])
    old = Key.create(Role.USER).public
    held = Held("shop", old, "orders", since=1_800_000_000, until=1_800_000_090)
    result = PassResult(
        started=0.0,
        plan=mesh,
        creds={("shop", "orders"): ok, ("shop", "web"): ok},
        held={("shop", "orders"): held},
    )
    conds = {c.type: c for c in status.service_conditions(result, "shop", "orders")}
    cond = conds[status.HELD_CONDITION]
    assert (cond.ok, cond.reason) == (False, "RevocationHeld")
    assert old in cond.message
    assert "2027-01-15T08:01:30Z" in cond.message
    # The service works on its new creds: Ready stays True.
    assert conds["Ready"].ok
    web = {c.type for c in status.service_conditions(result, "shop", "web")}
    assert status.HELD_CONDITION not in web
    # Once revoked (no longer held), the condition goes.
    result.held.clear()
    assert status.HELD_CONDITION not in {
        c.type for c in status.service_conditions(result, "shop", "orders")
    }
