"""``natsmesh analyze``'s rules over plain models: each fires on its mistake, and
stays quiet on the well-formed mesh beside it."""

from __future__ import annotations

from typing import Any

import pytest

from natsmesh_operator.api import NatsService
from natsmesh_operator.usercli import rules
from natsmesh_operator.usercli.rules import Finding, analyze
from natsmesh_operator.usercli.snapshot import InvalidResource
from tests.unit.usercli.meshbuild import dest, pods, route, snapshot, svc

pytestmark = pytest.mark.unit


def codes(found: list[Finding]) -> list[tuple[str, str, str]]:
    return [(f.code, f.severity, f"{f.kind} {f.namespace}/{f.name}") for f in found]


#: What the versions of orders share: subsets of one service declare one policy.
ORDERS: dict[str, Any] = {"callers": [{"name": "gateway"}], "publishes": ["order.created"]}


def orders_v2(endpoints: int) -> NatsService:
    labels = {"app": "orders", "version": "v2"}
    return svc(
        "orders-v2", service="orders", version="v2", labels=labels, endpoints=endpoints, **ORDERS
    )


def shop() -> list[NatsService]:
    """A mesh with nothing wrong: two versions of orders, a route, events, a grant."""
    return [
        svc("gateway", endpoints=1),
        svc("orders", labels={"app": "orders", "version": "v1"}, endpoints=2, **ORDERS),
        orders_v2(endpoints=1),
        svc(
            "payments",
            endpoints=1,
            subscriptions=[{"service": "orders", "topic": "order.created"}],
        ),
    ]


SHOP_PODS = pods(
    "shop",
    {"app": "gateway"},
    {"app": "orders", "version": "v1"},
    {"app": "orders", "version": "v2"},
    {"app": "payments"},
)


def test_a_well_formed_mesh_has_no_findings() -> None:
    canary = route(
        "orders", "orders", [{"name": "canary", "destinations": dest(("v1", 90), ("v2", 10))}]
    )
    snap = snapshot(shop(), [canary], pods_by_ns={"shop": SHOP_PODS})
    assert analyze(snap) == []


def test_route_to_a_version_without_a_natsservice_is_an_error() -> None:
    bad = route(
        "orders",
        "orders",
        [
            {"name": "canary", "destinations": dest(("v1", 80), ("v3", 20))},
            # 0% sends nothing: not reported.
            {"destinations": dest(("v1", 100), ("v9", 0))},
        ],
    )
    found = analyze(snapshot(shop(), [bad], pods_by_ns={"shop": SHOP_PODS}))
    assert codes(found) == [("NM001", "Error", "NatsRoute shop/orders")]
    assert (
        "rule canary: version v3 of orders has no NatsService (versions: v1, v2)"
        in found[0].message
    )
    assert "20%" in found[0].message


def test_route_to_an_unknown_service_is_one_error_not_one_per_version() -> None:
    found = analyze(snapshot(shop(), [route("r", "ordres", [{"destinations": dest(("v1", 100))}])]))
    assert codes(found) == [("NM003", "Error", "NatsRoute shop/r")]
    assert "service ordres has no NatsService in shop" in found[0].message


def test_route_to_a_version_without_endpoints_is_a_warning() -> None:
    services = shop()
    services[2] = orders_v2(endpoints=0)
    canary = route("orders", "orders", [{"destinations": dest(("v1", 90), ("v2", 10))}])
    found = analyze(snapshot(services, [canary], pods_by_ns={"shop": SHOP_PODS}))
    assert codes(found) == [("NM002", "Warning", "NatsRoute shop/orders")]
    assert "rule #1: version v2 of orders has no endpoints" in found[0].message


def test_endpoints_not_counted_yet_are_not_zero() -> None:
    services = [svc("orders", endpoints=None)]
    found = list(
        rules.route_endpoints(
            snapshot(services, [route("o", "orders", [{"destinations": dest(("v1", 100))}])])
        )
    )
    assert found == []


def test_subscription_to_a_missing_publisher_or_topic() -> None:
    services = [
        *shop(),
        svc("audit", subscriptions=[{"service": "billing", "topic": "invoice.sent"}]),
        svc("mailer", subscriptions=[{"service": "orders", "topic": "order.shipped"}]),
    ]
    found = analyze(
        snapshot(
            services,
            pods_by_ns={"shop": (*SHOP_PODS, *pods("shop", {"app": "audit"}, {"app": "mailer"}))},
        )
    )
    assert codes(found) == [
        ("NM004", "Error", "NatsService shop/audit"),
        ("NM005", "Error", "NatsService shop/mailer"),
    ]
    assert "no NatsService serves billing in shop" in found[0].message
    assert "orders does not publish order.shipped (it publishes: order.created)" in found[1].message


def test_cross_namespace_subscription_needs_the_publishers_grant() -> None:
    reports = svc(
        "reports",
        "analytics",
        subscriptions=[{"service": "orders", "namespace": "shop", "topic": "order.created"}],
    )
    without = analyze(snapshot([*shop(), reports], selected=["analytics"]))
    assert codes(without) == [("NM011", "Error", "NatsService analytics/reports")]
    assert "{name: reports, namespace: analytics}" in without[0].message

    granted = shop()
    granted[1] = svc(
        "orders",
        labels={"app": "orders", "version": "v1"},
        callers=[{"name": "gateway"}, {"name": "reports", "namespace": "analytics"}],
        publishes=["order.created"],
    )
    assert analyze(snapshot([*granted, reports], selected=["analytics"])) == []


def test_caller_naming_no_resource_is_a_warning_with_a_hint() -> None:
    services = [
        *shop(),
        # Names the mesh service (spec.service), not the resource: a classic mistake.
        svc("billing", callers=[{"name": "payment"}, {"name": "ghost", "namespace": "other"}]),
        svc("payment-v1", service="payment", labels={"app": "pay"}),
    ]
    found = [f for f in analyze(snapshot(services)) if f.code == "NM006"]
    assert [f.message.split(":")[0] for f in found] == [
        "allowedCallers names other/ghost",
        "allowedCallers names shop/payment",
    ]
    assert all(f.severity == "Warning" for f in found)
    assert "did you mean payment-v1?" in found[1].message


def test_unreadable_namespace_is_info_not_a_finding_of_absence() -> None:
    services = [svc("billing", callers=[{"name": "x", "namespace": "secret-ns"}])]
    found = analyze(snapshot(services, selected=["shop"], unreadable=["secret-ns"]))
    assert codes(found) == [("NM090", "Info", "NatsService shop/billing")]


def test_overlapping_selectors_are_an_error_naming_the_pods_in_both() -> None:
    services = [
        svc("a", labels={"app": "web"}),
        svc("b", labels={"tier": "front"}),
        svc("c", labels={"app": "db", "tier": "back"}),
    ]
    ns_pods = pods("shop", {"app": "web", "tier": "front"}, {"app": "db", "tier": "back"})
    found = analyze(snapshot(services, pods_by_ns={"shop": ns_pods}))
    assert codes(found) == [("NM007", "Error", "NatsService shop/b")]
    assert "overlaps NatsService a's: pods pod-0 match both" in found[0].message


def test_selector_matching_no_pod_only_when_pods_were_listed() -> None:
    services = [svc("lonely", labels={"app": "lonely"})]
    found = analyze(snapshot(services, pods_by_ns={"shop": pods("shop", {"app": "other"})}))
    assert codes(found) == [("NM008", "Warning", "NatsService shop/lonely")]
    assert "selector app=lonely matches no pod in shop" in found[0].message
    # Pods not listed (no permission): no claim about them.
    assert analyze(snapshot(services)) == []


def test_second_claimant_of_a_subject_is_an_error() -> None:
    services = [
        svc("orders", labels={"app": "o1"}, created="2026-01-01T00:00:00Z"),
        svc("aaa", service="orders", labels={"app": "o2"}, created="2026-01-02T00:00:00Z"),
    ]
    found = analyze(snapshot(services))
    assert codes(found) == [("NM012", "Error", "NatsService shop/aaa")]
    assert "already served by NatsService orders (created first)" in found[0].message


def test_invalid_resource_and_not_ready() -> None:
    services = [svc("gateway", ready=("False", "NatsUnavailable", "NATS unreachable"))]
    invalid = [InvalidResource("NatsRoute", "shop", "old", "1 validation error\nweights must sum")]
    found = analyze(snapshot(services, invalid=invalid))
    assert codes(found) == [
        ("NM009", "Error", "NatsRoute shop/old"),
        ("NM010", "Warning", "NatsService shop/gateway"),
    ]
    assert found[0].message == "invalid, left out by the operator: 1 validation error"
    assert found[1].message == "Ready=False (NatsUnavailable): NATS unreachable"


def test_not_ready_is_left_out_when_a_specific_finding_explains_it() -> None:
    bad = route(
        "orders",
        "orders",
        [{"destinations": dest(("v1", 50), ("v3", 50))}],
        ready=("False", "VersionsDropped", "v3 dropped"),
    )
    found = analyze(snapshot(shop(), [bad], pods_by_ns={"shop": SHOP_PODS}))
    assert codes(found) == [("NM001", "Error", "NatsRoute shop/orders")]


def test_only_the_selected_namespaces_are_reported() -> None:
    other = svc("x", "elsewhere", callers=[{"name": "nobody"}])
    found = analyze(snapshot([*shop(), other], selected=["shop"], pods_by_ns={"shop": SHOP_PODS}))
    assert found == []
    assert codes(analyze(snapshot([other]))) == [("NM006", "Warning", "NatsService elsewhere/x")]


def test_findings_sort_errors_first_and_render_like_istioctl() -> None:
    f = Finding("NM001", "Error", "NatsRoute", "shop", "orders", "something")
    w = Finding("NM000", "Warning", "NatsService", "shop", "a", "else")
    assert sorted([w, f], key=Finding.sort_key) == [f, w]
    assert f.line() == "Error [NM001] (NatsRoute shop/orders) something"
