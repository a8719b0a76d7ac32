"""The route compiler."""

from __future__ import annotations

import pytest

from natsmesh_operator.wiring.desired import CallerRef, ServiceIntent
from natsmesh_operator.wiring.plan import plan
from natsmesh_operator.wiring.routes import RouteDestination, RouteIntent, RouteRule
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
            "UnknownVersion",
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
