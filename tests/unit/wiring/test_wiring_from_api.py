"""CRD models -> intents (handlers.intents) -> plan: the shop as resources.

A contract test between the api models, the handler's conversion and the wiring.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from natsmesh_operator.api import NatsRoute, NatsService
from natsmesh_operator.handlers.intents import route_intent, service_intent
from natsmesh_operator.wiring.plan import plan
from natsmesh_sidecar import config as wire

pytestmark = pytest.mark.unit


def svc(name: str, spec: dict[str, Any]) -> NatsService:
    body = {
        "apiVersion": "natsmesh.io/v1alpha1",
        "kind": "NatsService",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": name}}, "port": 8080, **spec},
    }
    return NatsService.from_body(body)


def orders_route(name: str, rules: list[dict[str, Any]]) -> NatsRoute:
    body = {
        "apiVersion": "natsmesh.io/v1alpha1",
        "kind": "NatsRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"service": "orders", "rules": rules},
    }
    return NatsRoute.from_body(body)


def test_shop_resources_plan_like_the_shop_intents() -> None:
    resources = [
        svc("gateway", {"allowSameNamespace": False}),
        svc(
            "orders",
            {
                "allowSameNamespace": False,
                "allowedCallers": [{"name": "gateway"}],
                "events": {"publishes": [{"topic": "order.created"}], "stream": {"maxAge": "24h"}},
            },
        ),
        svc(
            "payments",
            {
                "allowSameNamespace": False,
                "allowedCallers": [{"name": "orders"}],
                "events": {
                    "subscriptions": [
                        {
                            "topic": "order.created",
                            "service": "orders",
                            "path": "/events/order-created",
                            "maxDeliver": 3,
                            "ackWait": "10s",
                            "backoff": ["1s", "5s"],
                        }
                    ]
                },
            },
        ),
        svc(
            "orders-v2",
            {
                "service": "orders",
                "version": "v2",
                "allowSameNamespace": False,
                "allowedCallers": [{"name": "gateway"}],
                "events": {"publishes": [{"topic": "order.created"}], "stream": {"maxAge": "24h"}},
            },
        ),
    ]
    intents = [service_intent(r) for r in resources]
    orders_v2 = intents[-1]
    assert (orders_v2.name, orders_v2.version, orders_v2.resource) == ("orders", "v2", "orders-v2")
    assert intents[1].publishes[0].stream.max_age_ms == 24 * 3600 * 1000
    (sub,) = intents[2].subscriptions
    assert (sub.max_deliver, sub.ack_wait_ms, sub.backoff_ms) == (3, 10_000, (1000, 5000))

    route = orders_route(
        "orders-canary",
        [
            {
                "name": "canary",
                "destinations": [
                    {"version": "v1", "weight": 80},
                    {"version": "v2", "weight": 20},
                ],
                "timeout": "3s",
                "retries": {"attempts": 1, "perTryTimeout": "1s", "retryOnCodes": [503]},
                "fault": {"abort": {"httpStatus": 503, "percent": 5}},
                "circuitBreaker": {"consecutiveFailures": 4, "openDuration": "30s"},
                "maxBodyBytes": 1048576,
                "stream": {"idleTimeout": "1m30s", "window": 32},
            },
            {
                "name": "plain",
                "match": {"pathPrefix": "/plain"},
                "destinations": [{"version": "v1"}],
                "stream": {},
            },
        ],
    )
    p = plan(intents, [route_intent(route)])
    assert p.problems == ()
    rule, plain, *_ = p.targets[("shop", "orders")].rules
    assert [(d.subject, d.weight) for d in rule.destinations] == [
        ("mesh.shop.orders.v1", 80),
        ("mesh.shop.orders.v2", 20),
    ]
    assert rule.timeout_ms == 3000
    assert rule.retries.per_try_timeout_ms == 1000
    assert "503" in rule.retries.retry_on
    assert rule.fault
    assert rule.fault.abort
    assert rule.fault.abort.status == 503
    assert rule.circuit_breaker
    assert rule.circuit_breaker.open_ms == 30_000
    assert rule.max_body_bytes == 1 << 20
    assert rule.stream == wire.StreamPolicy(idle_timeout_ms=90_000, window=32)
    # Unset (or empty) means the sidecar's settings.
    assert (plain.max_body_bytes, plain.stream) == (0, None)
    assert {u.resource for u in p.users} == {"gateway", "orders", "orders-v2", "payments"}


#: A compiled rule's keys before NatsRoute had maxBodyBytes and stream: what
#: a sidecar of then accepts (its Rule forbids unknown keys).
OLD_RULE_KEYS = {"name", "match", "destinations", "timeoutMs", "retries", "fault", "circuitBreaker"}


def test_a_rule_without_stream_limits_compiles_to_the_old_keys() -> None:
    """A new operator keeps serving old sidecars during an upgrade: the new
    fields are written only for the rules that set them."""
    intents = [svc("orders", {}), svc("gateway", {})]
    v1 = {"destinations": [{"version": "v1"}]}
    route = orders_route(
        "orders",
        [
            {"name": "big", "match": {"pathPrefix": "/b"}, "maxBodyBytes": 10, **v1},
            {"name": "sse", "match": {"pathPrefix": "/s"}, "stream": {"window": 2}, **v1},
            {"name": "empty", "match": {"pathPrefix": "/e"}, "stream": {}, **v1},
            {"name": "bare", **v1},
        ],
    )
    p = plan([service_intent(r) for r in intents], [route_intent(route)])
    assert p.problems == ()
    stored = json.loads(p.targets[("shop", "orders")].to_json())
    keys = {rule["name"]: set(rule) for rule in stored["rules"]}
    assert keys["big"] == OLD_RULE_KEYS | {"maxBodyBytes"}
    assert keys["sse"] == OLD_RULE_KEYS | {"stream"}
    assert keys["empty"] == keys["bare"] == OLD_RULE_KEYS
    # And the sidecar reads both shapes back to the same rules.
    assert wire.Target.model_validate_json(json.dumps(stored)) == p.targets[("shop", "orders")]


def test_grpc_retry_statuses_compile_to_numbers_and_only_where_set() -> None:
    """``retryOnGrpc`` names become gRPC's numbers in the table; a rule without
    them keeps the retries keys older sidecars accept."""
    intents = [svc("orders", {}), svc("gateway", {})]
    v1 = {"destinations": [{"version": "v1"}]}
    retries = {"attempts": 2, "retryOnGrpc": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]}
    route = orders_route(
        "orders",
        [
            {
                "name": "reads",
                "match": {"pathPrefix": "/shop.Orders/Get"},
                "retries": retries,
                **v1,
            },
            {"name": "http", "retries": {"attempts": 2}, **v1},
        ],
    )
    p = plan([service_intent(r) for r in intents], [route_intent(route)])
    assert p.problems == ()
    stored = json.loads(p.targets[("shop", "orders")].to_json())
    by_name = {rule["name"]: rule["retries"] for rule in stored["rules"]}
    assert by_name["reads"]["grpcRetryOn"] == [14, 8]
    assert "grpcRetryOn" not in by_name["http"]
    assert wire.Target.model_validate_json(json.dumps(stored)) == p.targets[("shop", "orders")]


def test_creation_order_reaches_the_plan() -> None:
    def claimant(name: str, created: str, uid: str) -> NatsService:
        body = {
            "apiVersion": "natsmesh.io/v1alpha1",
            "kind": "NatsService",
            "metadata": {
                "name": name,
                "namespace": "shop",
                "uid": uid,
                "creationTimestamp": created,
            },
            "spec": {"selector": {"matchLabels": {"app": name}}, "port": 8080, "service": "orders"},
        }
        return NatsService.from_body(body)

    orders = service_intent(claimant("orders", "2026-01-01T00:00:00Z", "b"))
    assert (orders.created, orders.uid) == ("2026-01-01T00:00:00Z", "b")
    aaa = service_intent(claimant("aaa", "2026-01-01T00:01:00Z", "a"))
    p = plan([aaa, orders])
    assert [u.resource for u in p.users] == ["orders"]
    assert [(x.name, x.reason) for x in p.problems] == [("aaa", "SubjectConflict")]
