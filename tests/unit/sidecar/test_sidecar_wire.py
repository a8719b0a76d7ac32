"""The sidecar's pydantic-free parser agrees with the config models (the source of truth).

Tables are the ones the operator really writes: the shop example resources
compiled through the wiring plan, plus hand-made routes that use every
traffic-policy field, plus a cross-namespace subscription. Each must parse to
exactly what ``config.MeshTable`` holds; invalid input must be refused by both.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from natsmesh_operator.wiring.desired import CallerRef, Publish, ServiceIntent, Subscribe
from natsmesh_operator.wiring.plan import plan
from natsmesh_operator.wiring.routes import RouteDestination, RouteIntent, RouteRule
from natsmesh_sidecar import config, wire
from tests.fixtures.nats_operator import shop_intents

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]


def as_plain(value: Any) -> Any:
    """A comparable form of either parser's result (field names, lists, dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(type(value), "model_fields"):
        return {name: as_plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict | type({}.items())) or hasattr(value, "items"):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_plain(v) for v in value]
    return value


def example_tables() -> list[config.MeshTable]:
    from natsmesh_operator.api import NatsRoute, NatsService
    from natsmesh_operator.handlers.intents import route_intent, service_intent

    services, routes = [], []
    for path in sorted((REPO / "examples" / "shop").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc["kind"] == "NatsService":
                doc.setdefault("metadata", {}).setdefault("namespace", "shop")
                services.append(service_intent(NatsService.model_validate(doc)))
            elif doc["kind"] == "NatsRoute":
                doc.setdefault("metadata", {}).setdefault("namespace", "shop")
                routes.append(route_intent(NatsRoute.model_validate(doc)))
    p = plan(services, routes)
    assert routes
    return list(p.tables.values())


def handmade_tables() -> list[config.MeshTable]:
    rich = RouteIntent(
        "shop",
        "orders",
        rules=(
            RouteRule(
                name="testers",
                destinations=(RouteDestination("v2"),),
                match=config.Match(
                    path_prefix="/api", methods=("GET", "PUT"), headers={"x-canary": "1"}
                ),
                timeout_ms=1234,
                retries=config.Retries(
                    attempts=3,
                    per_try_timeout_ms=400,
                    retry_on=("5xx", "503", "timeout"),
                    backoff_base_ms=10,
                    backoff_max_ms=90,
                    retry_non_idempotent=True,
                ),
                fault=config.Fault(
                    delay=config.FaultDelay(delay_ms=7, percent=12.5),
                    abort=config.FaultAbort(status=418, percent=100),
                ),
                circuit_breaker=config.CircuitBreaker(
                    consecutive_failures=2, open_ms=500, half_open_probes=3
                ),
            ),
            RouteRule(
                name="split",
                destinations=(RouteDestination("v1", 70), RouteDestination("v2", 30)),
                max_body_bytes=5 << 20,
                stream=config.StreamPolicy(idle_timeout_ms=2500, window=16),
            ),
        ),
    )
    intents = [
        *shop_intents("shop"),
        ServiceIntent(
            "shop",
            "orders",
            version="v2",
            allowed_callers=(CallerRef("gateway"),),
            allow_same_namespace=False,
            publishes=(Publish("order.created"),),
        ),
        ServiceIntent(
            "billing",
            "ledger",
            subscriptions=(
                Subscribe(
                    "order.created",
                    "orders",
                    "/events/ledger",
                    namespace="shop",
                    delivery="exactlyOnce",
                    max_deliver=4,
                    backoff_ms=(10, 20),
                ),
            ),
        ),
    ]
    # orders must admit ledger for a cross-namespace subscription.
    intents = [
        dataclasses.replace(i, allowed_callers=(*i.allowed_callers, CallerRef("ledger", "billing")))
        if i.name == "orders"
        else i
        for i in intents
    ]
    p = plan(intents, [rich])
    assert not [x for x in p.problems if x.kind == "NatsRoute"], p.problems
    return list(p.tables.values())


def all_tables() -> list[config.MeshTable]:
    return example_tables() + handmade_tables()


def test_the_examples_cover_the_interesting_fields() -> None:
    raw = b"".join(t.to_json() for t in all_tables())
    for needle in (
        b"circuitBreaker",
        b"retryOn",
        b"abort",
        b"delayMs",
        b"deadLetterSubject",
        b"natsmesh.jsapi.shop",
        b"exactlyOnce",
        b'"headers":{"x-canary"',
        b'"maxBodyBytes":5242880,"stream":{"idleTimeoutMs":2500,"window":16}',
    ):
        assert needle in raw, needle


@pytest.mark.parametrize("table", all_tables(), ids=lambda t: f"{t.service}.{t.namespace}")
def test_both_parsers_read_every_compiled_table_the_same(table: config.MeshTable) -> None:
    raw = table.to_json()
    mine = wire.parse_table(raw)
    theirs = config.MeshTable.from_json(raw)
    assert as_plain(mine) == as_plain(theirs)
    assert isinstance(mine.destinations, dict)
    assert wire.coerce_table(table) == mine


def test_defaults_and_field_names_agree() -> None:
    minimal = {
        "namespace": "ns",
        "service": "a",
        "destinations": {
            "b.ns": {
                "namespace": "ns",
                "service": "b",
                # Field names are accepted as well as aliases (populate_by_name).
                "rules": [{"destinations": [{"subject": "mesh.ns.b.v1"}], "timeout_ms": 9}],
            }
        },
        "subscriptions": [
            {
                "stream": "S",
                "consumer": "c",
                "topic": "t",
                "source": "b.ns",
                "path": "/e",
                "deadLetterSubject": "deadletter.ns.a.c",
            }
        ],
    }
    raw = json.dumps(minimal)
    assert as_plain(wire.parse_table(raw)) == as_plain(config.MeshTable.from_json(raw))


LAX: list[dict[str, Any]] = [
    {"destinations": [{"subject": "s", "weight": "5"}]},
    {"destinations": [{"subject": "s", "weight": " 5 "}]},
    {"destinations": [{"subject": "s", "weight": 5.0}]},
    {"destinations": [{"subject": "s", "weight": True}]},
    {"destinations": [], "fault": {"abort": {"status": 500, "percent": "12.5"}}},
    {"destinations": [], "fault": {"abort": {"status": 500, "percent": True}}},
    {"destinations": [], "fault": {"delay": {"delayMs": "3", "percent": 7}}},
    {"destinations": [], "retries": {"retryNonIdempotent": "true"}},
    {"destinations": [], "retries": {"retryNonIdempotent": "No"}},
    {"destinations": [], "retries": {"retryNonIdempotent": 1}},
    {"destinations": [], "maxBodyBytes": "1024", "stream": {"window": "4"}},
    {"destinations": [], "stream": {}},
    {"destinations": [], "stream": None},
    {"destinations": [], "retries": {"attempts": 2, "grpcRetryOn": [14, "8"]}},
    {"destinations": [], "retries": {"grpcRetryOn": []}},
]


@pytest.mark.parametrize("rule", LAX, ids=[json.dumps(r)[:60] for r in LAX])
def test_lax_inputs_are_read_alike(rule: dict[str, Any]) -> None:
    """Whatever pydantic's lax mode accepts, the sidecar reads to the same value."""
    raw = json.dumps(_wrap({"rules": [rule]}))
    assert as_plain(wire.parse_table(raw)) == as_plain(config.MeshTable.from_json(raw))


BAD: list[tuple[str, Any]] = [
    ("not an object", []),
    ("missing service", {"namespace": "ns"}),
    ("unknown field", {"namespace": "ns", "service": "a", "bogus": 1}),
    ("known is not a list", {"namespace": "ns", "service": "a", "known": "x"}),
    ("weight over 100", {"rules": [{"destinations": [{"subject": "s", "weight": 101}]}]}),
    ("negative weight", {"rules": [{"destinations": [{"subject": "s", "weight": -1}]}]}),
    ("missing subject", {"rules": [{"destinations": [{"weight": 1}]}]}),
    ("subject not a string", {"rules": [{"destinations": [{"subject": 5}]}]}),
    ("zero timeout", {"rules": [{"destinations": [{"subject": "s"}], "timeoutMs": 0}]}),
    ("too many retries", {"rules": [{"destinations": [], "retries": {"attempts": 11}}]}),
    (
        "abort status 600",
        {"rules": [{"destinations": [], "fault": {"abort": {"status": 600, "percent": 1}}}]},
    ),
    (
        "percent over 100",
        {"rules": [{"destinations": [], "fault": {"delay": {"delayMs": 1, "percent": 101}}}]},
    ),
    (
        "delay without delayMs",
        {"rules": [{"destinations": [], "fault": {"delay": {"percent": 1}}}]},
    ),
    (
        "breaker zero failures",
        {"rules": [{"destinations": [], "circuitBreaker": {"consecutiveFailures": 0}}]},
    ),
    ("unknown rule field", {"rules": [{"destinations": [], "weights": 1}]}),
    ("negative body limit", {"rules": [{"destinations": [], "maxBodyBytes": -1}]}),
    ("window over 256", {"rules": [{"destinations": [], "stream": {"window": 257}}]}),
    ("negative idle", {"rules": [{"destinations": [], "stream": {"idleTimeoutMs": -5}}]}),
    ("unknown stream field", {"rules": [{"destinations": [], "stream": {"chunk": 1}}]}),
    ("no rules", {}),
    ("gRPC status 17", {"rules": [{"destinations": [], "retries": {"grpcRetryOn": [17]}}]}),
    ("gRPC status OK", {"rules": [{"destinations": [], "retries": {"grpcRetryOn": [0]}}]}),
    ("gRPC status name", {"rules": [{"destinations": [], "retries": {"grpcRetryOn": ["x"]}}]}),
    ("word as bool", {"rules": [{"destinations": [], "retries": {"retryNonIdempotent": "maybe"}}]}),
    ("two as bool", {"rules": [{"destinations": [], "retries": {"retryNonIdempotent": 2}}]}),
    ("word as int", {"rules": [{"destinations": [{"subject": "s", "weight": "five"}]}]}),
    ("fractional int", {"rules": [{"destinations": [{"subject": "s", "weight": 1.5}]}]}),
]


def _wrap(case: Any) -> Any:
    """Rule-level cases go into a destination of an otherwise valid table."""
    if isinstance(case, dict) and ("rules" in case or case == {}):
        return {
            "namespace": "ns",
            "service": "a",
            "destinations": {"b.ns": {"namespace": "ns", "service": "b", **case}},
        }
    return case


@pytest.mark.parametrize(("name", "case"), BAD, ids=[b[0] for b in BAD])
def test_both_parsers_refuse_invalid_tables(name: str, case: Any) -> None:
    raw = json.dumps(_wrap(case))
    with pytest.raises(ValidationError):
        config.MeshTable.from_json(raw)
    with pytest.raises(wire.WireError):
        wire.parse_table(raw)


def test_bad_delivery_mode_and_not_json_are_refused() -> None:
    table = json.loads(handmade_tables()[0].to_json())
    for t in handmade_tables():
        if t.subscriptions:
            table = json.loads(t.to_json())
            break
    table["subscriptions"][0]["mode"] = "sometimes"
    raw = json.dumps(table)
    with pytest.raises(ValidationError):
        config.MeshTable.from_json(raw)
    with pytest.raises(wire.WireError):
        wire.parse_table(raw)
    with pytest.raises(wire.WireError):
        wire.parse_table(b"{not json")


ENV = {
    "NATSMESH_SERVICE": "orders",
    "NATSMESH_NAMESPACE": "shop",
    "NATSMESH_VERSION": "v2",
    "NATSMESH_NATS_URL": "nats://10.0.0.1:4222",
    "NATSMESH_CREDS_FILE": "/var/run/natsmesh/user.creds",
    "NATSMESH_APP_PORT": "8081",
    "NATSMESH_LISTEN_PORT": "0",
    "NATSMESH_ADMIN_PORT": "15021",
    "NATSMESH_MAX_INFLIGHT": "64",
    "NATSMESH_DRAIN_SECONDS": "2.5",
    "NATSMESH_PRESTOP_TOKEN": "0f3c9a",
    "NATSMESH_PRESTOP_HOLD_SECONDS": "45",
    "NATSMESH_READY_CHECK": "/healthz?deep=1",
    "NATSMESH_READY_PORT": "9090",
    "NATSMESH_READY_PERIOD_SECONDS": "0.5",
    "NATSMESH_READY_FAILURE_THRESHOLD": "2",
    "UNRELATED": "x",
}


def test_settings_from_env_agree() -> None:
    mine = wire.Settings.from_env(ENV)
    theirs = config.SidecarSettings.from_env(ENV)
    assert as_plain(mine) == as_plain(theirs)
    assert wire.Settings.coerce(theirs) == mine
    minimal = {"NATSMESH_SERVICE": "a", "NATSMESH_NAMESPACE": "b"}
    assert as_plain(wire.Settings.from_env(minimal)) == as_plain(
        config.SidecarSettings.from_env(minimal)
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"NATSMESH_APP_PORT": "0"},
        {"NATSMESH_APP_PORT": "70000"},
        {"NATSMESH_APP_PORT": "eighty"},
        {"NATSMESH_MAX_INFLIGHT": "0"},
        {"NATSMESH_DRAIN_SECONDS": "-1"},
        {"NATSMESH_SERVICE": None},
        {"NATSMESH_READY_CHECK": "healthz"},
        {"NATSMESH_READY_CHECK": "/a b"},
        {"NATSMESH_READY_CHECK": "exec"},
        {"NATSMESH_READY_CHECK": "tcp\n"},
        {"NATSMESH_READY_FAILURE_THRESHOLD": "0"},
    ],
)
def test_settings_both_refuse_bad_env(bad: dict[str, str | None]) -> None:
    env = {**ENV, **{k: v for k, v in bad.items() if v is not None}}
    for k, v in bad.items():
        if v is None:
            env.pop(k)
    with pytest.raises(ValueError):  # noqa: PT011 - pydantic's and ours are both ValueErrors
        config.SidecarSettings.from_env(env)
    with pytest.raises(ValueError):  # noqa: PT011
        wire.Settings.from_env(env)
