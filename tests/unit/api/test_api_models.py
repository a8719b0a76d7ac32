"""The pydantic models: wire format, defaults, and the same refusals as the API server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from natsmesh_operator.api import (
    RESOURCES,
    CustomResource,
    NatsRoute,
    NatsService,
    Retries,
    Rule,
    Subscription,
    parse_duration_ms,
)
from natsmesh_operator.api.service import CALLER_SERVICE_REFUSED
from natsmesh_operator.crdgen.crd import crd
from tests.unit.api.invalid_resources import CASES, ROUTE, SERVICE, Case

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))
KINDS = {r.KIND: r for r in RESOURCES}


def load(body: dict[str, Any]) -> CustomResource:
    return KINDS[body["kind"]].model_validate(body)


# --------------------------------------------------------------------------
# durations
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("250ms", 250),
        ("2s", 2_000),
        ("1m", 60_000),
        ("1h", 3_600_000),
        ("1m30s", 90_000),
        ("1.5s", 1_500),
        ("0.5ms", 1),  # rounds up: a non-zero duration never becomes 0
        ("0s", 0),
        ("1h1m1s1ms", 3_661_001),
    ],
)
def test_parse_duration_ms(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["", "5", "-1s", "1d", "1 s", "s", "1.s", "1e3ms", "2 seconds"])
def test_parse_duration_ms_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration_ms(text)


@given(
    st.lists(
        st.tuples(st.integers(0, 100_000), st.sampled_from(["ms", "s", "m", "h"])),
        min_size=1,
        max_size=4,
    )
)
def test_parse_duration_ms_sums_parts(parts: list[tuple[int, str]]) -> None:
    unit = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000}
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration_ms(text) == sum(n * unit[u] for n, u in parts)


# --------------------------------------------------------------------------
# wire format and defaults
# --------------------------------------------------------------------------


def test_service_defaults_and_camel_case() -> None:
    svc = NatsService.model_validate(SERVICE)
    assert svc.spec.version == "v1"
    assert svc.spec.allow_same_namespace is True
    assert svc.spec.allowed_callers == []
    assert svc.spec.events.stream.retention == "limits"
    assert svc.spec.events.stream.max_age == "168h"
    sub = svc.spec.events.subscriptions[0]
    assert (sub.delivery, sub.effective_max_deliver, sub.ack_wait_ms) == ("atLeastOnce", 5, 30_000)
    wire = svc.to_wire()
    assert wire["spec"]["allowSameNamespace"] is True
    assert wire["spec"]["selector"] == {"matchLabels": {"app": "orders"}, "matchExpressions": []}
    assert "maxDeliver" not in wire["spec"]["events"]["subscriptions"][0]  # unset stays unset
    assert NatsService.model_validate(wire) == svc


def test_snake_case_names_are_accepted_too() -> None:
    sub = Subscription(topic="a.b", service="orders", path="/x", max_deliver=3, ack_wait="5s")
    assert sub.to_wire() == {
        "topic": "a.b",
        "service": "orders",
        "path": "/x",
        "delivery": "atLeastOnce",
        "maxDeliver": 3,
        "ackWait": "5s",
        "backoff": [],
    }


def test_route_defaults() -> None:
    rule = Rule.model_validate({"destinations": [{"version": "v1"}]})
    assert rule.destinations[0].weight == 100
    assert rule.timeout_ms == 15_000
    assert rule.match.path_prefix == "/"
    assert rule.retries is None
    retries = Retries()
    assert retries.attempts == 2
    assert retries.retry_on == ["noResponders", "timeout"]
    assert (retries.backoff.base, retries.backoff.max) == ("25ms", "250ms")


def test_at_most_once_is_delivered_once() -> None:
    sub = Subscription(topic="a", service="b", path="/x", delivery="atMostOnce")
    assert sub.effective_max_deliver == 1


def test_service_name_defaults_to_the_resource_name() -> None:
    body = {**SERVICE, "spec": {**SERVICE["spec"], "version": "v2"}}
    assert NatsService.model_validate(body).service_name == "orders"
    body["metadata"] = {"name": "orders-v2"}
    body["spec"]["service"] = "orders"
    assert NatsService.model_validate(body).service_name == "orders"


def test_unknown_fields_are_refused() -> None:
    body = {**SERVICE, "spec": {**SERVICE["spec"], "prot": 1}}
    with pytest.raises(ValidationError, match="prot"):
        NatsService.model_validate(body)


def test_metadata_extras_are_kept() -> None:
    body = {**SERVICE, "metadata": {"name": "orders", "managedFields": [{"manager": "x"}]}}
    svc = NatsService.model_validate(body)
    assert svc.metadata.model_extra == {"managedFields": [{"manager": "x"}]}


def with_callers(*callers: dict[str, str]) -> dict[str, Any]:
    return {**SERVICE, "spec": {**SERVICE["spec"], "allowedCallers": list(callers)}}


def test_a_caller_is_a_resource_name_and_an_optional_namespace() -> None:
    spec = NatsService.model_validate(
        with_callers({"name": "gateway"}, {"name": "reports", "namespace": "analytics"})
    ).spec
    assert [(c.name, c.namespace) for c in spec.allowed_callers] == [
        ("gateway", None),
        ("reports", "analytics"),
    ]
    assert spec.to_wire()["allowedCallers"] == [
        {"name": "gateway"},
        {"name": "reports", "namespace": "analytics"},
    ]


@pytest.mark.parametrize(
    "caller",
    [{"service": "frontend"}, {"service": "frontend", "name": "frontend"}],
    ids=["service-alone", "service-beside-name"],
)
def test_a_caller_by_service_name_is_refused_saying_to_use_name(caller: dict[str, str]) -> None:
    # Not just "name: field required": the old field is named, and what to write instead.
    with pytest.raises(ValidationError) as error:
        NatsService.model_validate(with_callers(caller))
    assert CALLER_SERVICE_REFUSED in str(error.value)
    assert "write name: <its metadata.name>" in str(error.value)


# --------------------------------------------------------------------------
# examples and the invalid-resource table
# --------------------------------------------------------------------------


def mesh_documents(path: Path) -> list[dict[str, Any]]:
    """The natsmesh resources in one example file (examples may hold other kinds)."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return [d for d in docs if str(d.get("apiVersion", "")).startswith("natsmesh.io/")]


def test_shop_has_both_kinds() -> None:
    kinds = [d["kind"] for p in EXAMPLES if "shop" in p.parts for d in mesh_documents(p)]
    assert kinds.count("NatsService") >= 4
    assert kinds.count("NatsRoute") >= 1


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO / "examples")))
def test_examples_are_valid(path: Path) -> None:
    for body in mesh_documents(path):
        load(body)


def test_shop_canary_is_90_10() -> None:
    route = NatsRoute.model_validate(
        yaml.safe_load((REPO / "examples/shop/orders-route.yaml").read_text())
    )
    weights = {
        d.version: d.weight for r in route.spec.rules for d in r.destinations if r.name == "canary"
    }
    assert weights == {"v1": 90, "v2": 10}


def _cel_messages() -> list[str]:
    messages: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            messages.extend(rule["message"] for rule in node.get("x-kubernetes-validations", []))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for resource in RESOURCES:
        walk(crd(resource))
    return messages


CEL_MESSAGES = _cel_messages()


def test_base_bodies_are_valid() -> None:
    load(SERVICE)
    load(ROUTE)


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 20
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [c for c in CASES if not c.server_only], ids=lambda c: c.id)
def test_models_refuse_what_the_server_refuses(case: Case) -> None:
    with pytest.raises(ValidationError) as error:
        load(case.body())
    # Where the server's message is one of our CEL messages, Python says the same.
    for fragment in case.expect:
        if any(fragment in message for message in CEL_MESSAGES):
            assert fragment in str(error.value)
