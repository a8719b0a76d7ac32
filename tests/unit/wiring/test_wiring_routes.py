"""The route compiler."""

from __future__ import annotations

from dataclasses import replace

import pytest

from natsmesh_operator.wiring.desired import CallerRef, ServiceIntent
from natsmesh_operator.wiring.plan import plan
from natsmesh_operator.wiring.routes import RouteDestination, RouteIntent, RouteRule, rescale
from natsmesh_sidecar.config import CircuitBreaker, Match, Retries, Target

pytestmark = pytest.mark.unit


def services() -> list[ServiceIntent]:
    callers = (CallerRef("gateway"),)
    return [
        ServiceIntent("shop", "gateway", allowed_callers=()),
        ServiceIntent("shop", "orders", "v1", allowed_callers=callers),
        ServiceIntent("shop", "orders", "v2", allowed_callers=callers, resource="orders-v2"),
    ]


def canary(**rule: object) -> RouteIntent:
    return RouteIntent(
        "shop",
        "orders",
        (
            RouteRule(
                name="canary",
                destinations=(RouteDestination("v1", 90), RouteDestination("v2", 10)),
                **rule,  # type: ignore[arg-type]
            ),
        ),
    )


def test_without_a_route_calls_go_to_v1() -> None:
    dest = plan(services()).targets[("shop", "orders")]
    (rule,) = dest.rules
    assert [(d.version, d.weight, d.subject) for d in rule.destinations] == [
        ("v1", 100, "mesh.shop.orders.v1")
    ]


def test_weighted_split_with_policies_is_compiled_into_the_target() -> None:
    route = canary(
        timeout_ms=2000,
        retries=Retries(attempts=2, per_try_timeout_ms=500),
        circuit_breaker=CircuitBreaker(consecutive_failures=3),
    )
    p = plan(services(), [route])
    assert p.problems == ()
    (rule,) = p.targets[("shop", "orders")].rules
    assert [(d.version, d.weight, d.subject) for d in rule.destinations] == [
        ("v1", 90, "mesh.shop.orders.v1"),
        ("v2", 10, "mesh.shop.orders.v2"),
    ]
    assert rule.timeout_ms == 2000
    assert rule.retries.attempts == 2
    assert rule.circuit_breaker
    assert rule.circuit_breaker.consecutive_failures == 3
    target = p.targets[("shop", "orders")]
    assert Target.model_validate_json(target.to_json()) == target
    assert target.generation != plan(services()).targets[("shop", "orders")].generation
    # Callers' own tables do not change with a route of their namespace.
    assert p.tables[("shop", "gateway")] == plan(services()).tables[("shop", "gateway")]


def test_a_matching_rule_gets_a_catch_all_behind_it() -> None:
    route = canary(match=Match(path_prefix="/beta"))
    (beta, rest) = plan(services(), [route]).targets[("shop", "orders")].rules
    assert beta.match.path_prefix == "/beta"
    assert rest.match == Match()
    assert rest.destinations[0].version == "v1"


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        (
            RouteIntent("shop", "orders", (RouteRule((RouteDestination("v3"),)),)),
            "VersionsDropped",
        ),
        (
            RouteIntent(
                "shop",
                "orders",
                (RouteRule((RouteDestination("v1", 50), RouteDestination("v2", 20))),),
            ),
            "BadWeights",
        ),
        (RouteIntent("shop", "orders", ()), "NoRules"),
        (RouteIntent("shop", "ghost", (RouteRule((RouteDestination("v1"),)),)), "UnknownService"),
        (
            RouteIntent(
                "shop",
                "orders",
                (
                    RouteRule(
                        (RouteDestination("v1"),),
                        timeout_ms=100,
                        retries=Retries(per_try_timeout_ms=200),
                    ),
                ),
            ),
            "BadTimeout",
        ),
    ],
)
def test_bad_routes_are_problems_and_keep_default_rules(route: RouteIntent, reason: str) -> None:
    p = plan(services(), [route])
    assert [(x.kind, x.reason) for x in p.problems] == [("NatsRoute", reason)]
    dest = p.targets[("shop", "orders")]
    assert dest.rules[0].destinations[0].subject == "mesh.shop.orders.v1"


def test_two_routes_for_one_service() -> None:
    p = plan(services(), [canary(), RouteIntent("shop", "orders", canary().rules, "second")])
    assert [(x.name, x.reason) for x in p.problems] == [("second", "RouteConflict")]


def inconsistent_v2() -> list[ServiceIntent]:
    """orders-v2 admits other callers than v1: the plan leaves it out."""
    gateway, v1, v2 = services()
    return [gateway, v1, replace(v2, allowed_callers=())]


def test_an_inconsistent_canary_version_is_dropped_and_named() -> None:
    route = canary(timeout_ms=2000, retries=Retries(attempts=2, per_try_timeout_ms=500))
    p = plan(inconsistent_v2(), [route])
    (problem,) = p.problems_for("NatsRoute", "shop", "orders")
    assert problem.reason == "VersionsDropped"
    assert "v2 (NatsService orders-v2 is InconsistentSubsets)" in problem.message
    # The rest of the route still applies: v1 takes v2's share, policies kept.
    (rule,) = p.targets[("shop", "orders")].rules
    assert [(d.version, d.weight) for d in rule.destinations] == [("v1", 100)]
    assert (rule.name, rule.timeout_ms, rule.retries.attempts) == ("canary", 2000, 2)


def test_a_rule_left_without_versions_is_dropped_and_named() -> None:
    testers = RouteRule(
        (RouteDestination("v2"),), name="testers", match=Match(headers={"x-canary": "always"})
    )
    route = RouteIntent("shop", "orders", (testers, *canary().rules))
    p = plan(inconsistent_v2(), [route])
    (problem,) = p.problems_for("NatsRoute", "shop", "orders")
    assert "rule(s) 'testers' dropped" in problem.message
    assert [r.name for r in p.targets[("shop", "orders")].rules] == ["canary"]


def test_a_version_nobody_serves_is_named_as_such() -> None:
    route = RouteIntent(
        "shop", "orders", (RouteRule((RouteDestination("v1", 50), RouteDestination("v3", 50))),)
    )
    (problem,) = plan(services(), [route]).problems_for("NatsRoute", "shop", "orders")
    assert "v3 (no NatsService of orders serves v3)" in problem.message


@pytest.mark.parametrize(
    ("weights", "scaled"),
    [
        ([90], [100]),
        ([0], [100]),
        ([50, 30], [63, 37]),
        ([1, 1, 1], [34, 33, 33]),
        ([0, 0], [50, 50]),
    ],
)
def test_rescale_keeps_proportions_and_sums_to_100(weights: list[int], scaled: list[int]) -> None:
    assert rescale(weights) == scaled
    assert sum(scaled) == 100
