"""The table of invalid resources, shared by the unit tier (the models refuse
them) and the integration tier (the real API server refuses them).

Each case starts from a valid NatsService or NatsRoute, changes one thing,
and names the fragments the API server's message must contain: the field
path and the rule (pattern, bound, enum or CEL message).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

SERVICE: dict[str, Any] = {
    "apiVersion": "natsmesh.io/v1alpha1",
    "kind": "NatsService",
    "metadata": {"name": "orders"},
    "spec": {
        "selector": {"matchLabels": {"app": "orders"}},
        "port": 8080,
        "events": {
            "publishes": [{"topic": "order.created"}],
            "subscriptions": [
                {"topic": "payment.completed", "service": "payments", "path": "/events/paid"}
            ],
        },
    },
}

ROUTE: dict[str, Any] = {
    "apiVersion": "natsmesh.io/v1alpha1",
    "kind": "NatsRoute",
    "metadata": {"name": "orders"},
    "spec": {
        "service": "orders",
        "rules": [
            {
                "name": "canary",
                "destinations": [{"version": "v1", "weight": 90}, {"version": "v2", "weight": 10}],
                "timeout": "2s",
                "retries": {"attempts": 2, "perTryTimeout": "500ms"},
            }
        ],
    },
}


@dataclass(frozen=True)
class Case:
    id: str
    base: dict[str, Any]
    changes: dict[str, Any]
    """Dotted path (list indexes as numbers) -> new value; `DELETE` removes it."""
    expect: tuple[str, ...]
    """Fragments the API server's error message must contain."""
    server_only: bool = False
    """Not a model error (e.g. a typo'd field name only the server reports)."""

    def body(self) -> dict[str, Any]:
        body = copy.deepcopy(self.base)
        for path, value in self.changes.items():
            _set(body, path, value)
        return body


DELETE = object()


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = body
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value


def _svc(id: str, changes: dict[str, Any], *expect: str, server_only: bool = False) -> Case:
    return Case(id, SERVICE, changes, expect, server_only)


def _route(id: str, changes: dict[str, Any], *expect: str) -> Case:
    return Case(id, ROUTE, changes, expect)


_SUB = "spec.events.subscriptions[0]"
_RULE = "spec.rules[0]"

CASES: tuple[Case, ...] = (
    # --- NatsService: types, bounds, enums
    _svc("port-wrong-type", {"spec.port": "http"}, "spec.port", "must be of type integer"),
    _svc("port-too-big", {"spec.port": 70000}, "spec.port", "less than or equal to 65535"),
    _svc("port-of-sidecar", {"spec.port": 15001}, "spec.port", "the sidecar listens there"),
    _svc("selector-empty", {"spec.selector": {}}, "spec.selector", "selector must set matchLabels"),
    _svc("selector-missing", {"spec.selector": DELETE}, "spec.selector", "Required value"),
    _svc(
        "selector-in-without-values",
        {"spec.selector": {"matchExpressions": [{"key": "app", "operator": "In"}]}},
        "spec.selector.matchExpressions[0].values",
        "values must be non-empty for In and NotIn",
    ),
    _svc(
        "selector-unknown-operator",
        {"spec.selector": {"matchExpressions": [{"key": "app", "operator": "Matches"}]}},
        "spec.selector.matchExpressions[0].operator",
        'Unsupported value: "Matches"',
    ),
    _svc("typo-field", {"spec.prot": 8080}, 'unknown field "spec.prot"', server_only=True),
    # --- NatsService: names that would break NATS subjects
    _svc("name-with-dot", {"metadata.name": "orders.v2"}, "metadata.name", "should match"),
    _svc("version-with-dot", {"spec.version": "v1.2"}, "spec.version", "should match"),
    _svc("version-with-star", {"spec.version": "v*"}, "spec.version", "should match"),
    _svc(
        "caller-with-space",
        {"spec.allowedCallers": [{"name": "front end"}]},
        "spec.allowedCallers[0].name",
        "should match",
    ),
    _svc(
        "caller-namespace-with-gt",
        {"spec.allowedCallers": [{"name": "reports", "namespace": "analytics>"}]},
        "spec.allowedCallers[0].namespace",
        "should match",
    ),
    # A grant names a resource now: the old field is refused, saying what to write.
    _svc(
        "caller-by-service",
        {"spec.allowedCallers": [{"service": "frontend"}]},
        "spec.allowedCallers[0].service",
        "write name: <its metadata.name> instead",
    ),
    _svc(
        "caller-by-service-beside-name",
        {"spec.allowedCallers": [{"name": "web", "service": "frontend"}]},
        "spec.allowedCallers[0].service",
        "write name: <its metadata.name> instead",
    ),
    _svc(
        "caller-without-name",
        {"spec.allowedCallers": [{"namespace": "web"}]},
        "spec.allowedCallers[0].name",
        "allowedCallers[].name is required",
    ),
    _svc(
        "topic-with-star",
        {"spec.events.publishes.0.topic": "order.*"},
        "spec.events.publishes[0].topic",
        "should match",
    ),
    _svc(
        "topic-with-gt",
        {"spec.events.publishes.0.topic": "order.>"},
        "spec.events.publishes[0].topic",
        "should match",
    ),
    _svc(
        "topic-with-space",
        {"spec.events.publishes.0.topic": "order created"},
        "spec.events.publishes[0].topic",
        "should match",
    ),
    _svc(
        "topic-empty-token",
        {"spec.events.publishes.0.topic": "order..created"},
        "spec.events.publishes[0].topic",
        "should match",
    ),
    _svc(
        "topic-duplicate",
        {"spec.events.publishes": [{"topic": "order.created"}, {"topic": "order.created"}]},
        "spec.events.publishes[1]",
        "Duplicate value",
    ),
    _svc(
        "too-many-callers",
        {"spec.allowedCallers": [{"name": f"caller-{i}"} for i in range(65)]},
        "spec.allowedCallers",
        "must have at most 64 items",
    ),
    # --- NatsService: streams and subscriptions
    _svc(
        "stream-replicas",
        {"spec.events.stream": {"replicas": 7}},
        "spec.events.stream.replicas",
        "less than or equal to 5",
    ),
    _svc(
        "stream-retention-enum",
        {"spec.events.stream": {"retention": "forever"}},
        "spec.events.stream.retention",
        'Unsupported value: "forever"',
    ),
    _svc(
        "stream-max-age-zero",
        {"spec.events.stream": {"maxAge": "0s"}},
        "spec.events.stream.maxAge",
        "must be between 1s and 8760h",
    ),
    _svc(
        "delivery-enum",
        {"spec.events.subscriptions.0.delivery": "maybeOnce"},
        f"{_SUB}.delivery",
        'Unsupported value: "maybeOnce"',
    ),
    _svc(
        "at-most-once-redelivered",
        {
            "spec.events.subscriptions.0.delivery": "atMostOnce",
            "spec.events.subscriptions.0.maxDeliver": 3,
        },
        f"{_SUB}.maxDeliver",
        "atMostOnce delivery is never redelivered",
    ),
    _svc(
        "at-most-once-ack-wait",
        {
            "spec.events.subscriptions.0.delivery": "atMostOnce",
            "spec.events.subscriptions.0.ackWait": "30s",
        },
        f"{_SUB}.ackWait",
        "ackWait must be unset",
    ),
    _svc(
        "backoff-longer-than-max-deliver",
        {"spec.events.subscriptions.0.backoff": ["1s", "2s", "3s", "4s", "5s"]},
        f"{_SUB}.backoff",
        "backoff must have fewer steps than maxDeliver",
    ),
    _svc(
        "ack-wait-negative",
        {"spec.events.subscriptions.0.ackWait": "-5s"},
        f"{_SUB}.ackWait",
        "should match",
    ),
    _svc(
        "ack-wait-too-short",
        {"spec.events.subscriptions.0.ackWait": "10ms"},
        f"{_SUB}.ackWait",
        "must be between 1s and 12h",
    ),
    _svc(
        "path-relative",
        {"spec.events.subscriptions.0.path": "events/paid"},
        f"{_SUB}.path",
        "should match",
    ),
    # --- NatsRoute
    _route(
        "weights-not-100",
        {"spec.rules.0.destinations.1.weight": 20},
        f"{_RULE}.destinations",
        "destination weights must sum to 100",
    ),
    _route(
        "weight-over-100",
        {"spec.rules.0.destinations": [{"version": "v1", "weight": 150}]},
        f"{_RULE}.destinations[0].weight",
        "less than or equal to 100",
    ),
    _route(
        "destination-version-duplicate",
        {"spec.rules.0.destinations.1.version": "v1"},
        f"{_RULE}.destinations[1]",
        "Duplicate value",
    ),
    _route(
        "destination-version-with-gt",
        {"spec.rules.0.destinations.1.version": "v2>"},
        f"{_RULE}.destinations[1].version",
        "should match",
    ),
    _route("timeout-negative", {"spec.rules.0.timeout": "-1s"}, f"{_RULE}.timeout", "should match"),
    _route(
        "timeout-not-duration",
        {"spec.rules.0.timeout": "2 seconds"},
        f"{_RULE}.timeout",
        "should match",
    ),
    _route(
        "timeout-too-long",
        {"spec.rules.0.timeout": "2h"},
        f"{_RULE}.timeout",
        "must be between 1ms and 1h",
    ),
    _route(
        "per-try-not-shorter",
        {"spec.rules.0.retries.perTryTimeout": "2s"},
        f"{_RULE}.retries.perTryTimeout",
        "retries.perTryTimeout must be shorter than timeout",
    ),
    _route(
        "attempts-too-many",
        {"spec.rules.0.retries.attempts": 11},
        f"{_RULE}.retries.attempts",
        "less than or equal to 10",
    ),
    _route(
        "retry-on-enum",
        {"spec.rules.0.retries.retryOn": ["always"]},
        f"{_RULE}.retries.retryOn[0]",
        'Unsupported value: "always"',
    ),
    _route(
        "retry-on-nothing",
        {"spec.rules.0.retries.retryOn": []},
        f"{_RULE}.retries.retryOn",
        "need retryOn, retryOnCodes or retryOnGrpc",
    ),
    _route(
        # Istio spells them in lower case: the message lists gRPC's own names.
        "retry-on-grpc-spelling",
        {"spec.rules.0.retries.retryOnGrpc": ["unavailable"]},
        f"{_RULE}.retries.retryOnGrpc[0]",
        'Unsupported value: "unavailable"',
        '"UNAVAILABLE"',
    ),
    _route(
        # The app's answer about the request: a second try repeats it.
        "retry-on-grpc-not-transient",
        {"spec.rules.0.retries.retryOnGrpc": ["NOT_FOUND"]},
        f"{_RULE}.retries.retryOnGrpc[0]",
        'Unsupported value: "NOT_FOUND"',
    ),
    _route(
        "retry-code-not-error",
        {"spec.rules.0.retries.retryOnCodes": [200]},
        f"{_RULE}.retries.retryOnCodes[0]",
        "greater than or equal to 400",
    ),
    _route(
        "backoff-base-over-max",
        {"spec.rules.0.retries.backoff": {"base": "1s", "max": "100ms"}},
        f"{_RULE}.retries.backoff.max",
        "backoff.max must not be shorter than backoff.base",
    ),
    _route(
        "method-enum",
        {"spec.rules.0.match": {"methods": ["FETCH"]}},
        f"{_RULE}.match.methods[0]",
        'Unsupported value: "FETCH"',
    ),
    _route(
        "header-upper-case",
        {"spec.rules.0.match": {"headers": {"X-Canary": "yes"}}},
        f"{_RULE}.match.headers",
        "header names must be lower-case",
    ),
    _route(
        "fault-empty",
        {"spec.rules.0.fault": {}},
        f"{_RULE}.fault",
        "fault must set delay or abort",
    ),
    _route(
        "fault-abort-not-error",
        {"spec.rules.0.fault": {"abort": {"httpStatus": 200}}},
        f"{_RULE}.fault.abort.httpStatus",
        "greater than or equal to 400",
    ),
    _route(
        "fault-percent",
        {"spec.rules.0.fault": {"delay": {"fixedDelay": "100ms", "percent": 150}}},
        f"{_RULE}.fault.delay.percent",
        "less than or equal to 100",
    ),
    _route(
        "circuit-breaker-zero",
        {"spec.rules.0.circuitBreaker": {"consecutiveFailures": 0}},
        f"{_RULE}.circuitBreaker.consecutiveFailures",
        "greater than or equal to 1",
    ),
    _route(
        "max-body-zero",
        {"spec.rules.0.maxBodyBytes": 0},
        f"{_RULE}.maxBodyBytes",
        "greater than or equal to 1",
    ),
    _route(
        "max-body-not-a-number",
        {"spec.rules.0.maxBodyBytes": "16Mi"},
        f"{_RULE}.maxBodyBytes",
        'must be of type integer: "string"',
    ),
    _route(
        "stream-window-zero",
        {"spec.rules.0.stream": {"window": 0}},
        f"{_RULE}.stream.window",
        "greater than or equal to 1",
    ),
    _route(
        "stream-window-too-large",
        {"spec.rules.0.stream": {"window": 65}},
        f"{_RULE}.stream.window",
        "less than or equal to 64",
    ),
    _route(
        "stream-idle-too-short",
        {"spec.rules.0.stream": {"idleTimeout": "500ms"}},
        f"{_RULE}.stream.idleTimeout",
        "must be between 1s and 1h",
    ),
    _route(
        "stream-idle-not-duration",
        {"spec.rules.0.stream": {"idleTimeout": 60}},
        f"{_RULE}.stream.idleTimeout",
        'must be of type string: "integer"',
    ),
    _route("no-rules", {"spec.rules": []}, "spec.rules", "should have at least 1 items"),
    _route(
        "too-many-rules",
        {"spec.rules": [{"destinations": [{"version": "v1"}]} for _ in range(33)]},
        "spec.rules",
        "must have at most 32 items",
    ),
    _route(
        "rule-names-duplicate",
        {"spec.rules": [{"name": "a", "destinations": [{"version": "v1"}]}] * 2},
        "spec.rules",
        "rule names must be unique",
    ),
    _route("service-with-gt", {"spec.service": "orders>"}, "spec.service", "should match"),
    _route("service-missing", {"spec.service": DELETE}, "spec.service", "Required value"),
)
