"""``natsmesh status``'s tables: rows from plain models, rendered as kubectl would."""

from __future__ import annotations

from typing import Any

import pytest

from natsmesh_operator.usercli import table, view
from natsmesh_operator.usercli.view import ConsumerLag
from tests.unit.usercli.meshbuild import dest, route, snapshot, svc

pytestmark = pytest.mark.unit

READY = ("True", "Ready", "")
#: The policy both versions of orders declare (subsets of one service share it).
ORDERS: dict[str, Any] = {
    "same_namespace": False,
    "callers": [
        {"name": "gateway"},
        {"name": "reports", "namespace": "analytics"},
        {"name": "ghost"},
    ],
    "publishes": ["order.created", "order.cancelled"],
}


def test_render_aligns_left_three_spaces_apart_without_trailing_blanks() -> None:
    out = table.render(["NAME", "READY", "X"], [["a", "True", ""], ["longer-name", "False", "1"]])
    assert out.splitlines() == [
        "NAME          READY   X",
        "a             True",
        "longer-name   False   1",
    ]


def test_render_refuses_a_row_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        table.render(["A", "B", "C"], [["1", "2"]])


def test_without_column_drops_header_and_cells() -> None:
    headers, rows = table.without_column(["NAMESPACE", "NAME"], [["shop", "a"]], "NAMESPACE")
    assert (headers, rows) == (["NAME"], [["a"]])
    assert table.without_column(["NAME"], [["a"]], "NAMESPACE") == (["NAME"], [["a"]])


def shop_snapshot(selected: list[str] | None = None):  # type: ignore[no-untyped-def]
    return snapshot(
        [
            svc("gateway", endpoints=2, ready=READY, same_namespace=False),
            svc("orders", labels={"app": "orders", "v": "1"}, endpoints=3, ready=READY, **ORDERS),
            svc(
                "orders-v2",
                service="orders",
                version="v2",
                labels={"app": "orders", "v": "2"},
                endpoints=0,
                ready=("False", "NoEndpoints", ""),
                **ORDERS,
            ),
            svc(
                "payments",
                ready=READY,
                subscriptions=[
                    {"service": "orders", "topic": "order.created", "delivery": "exactlyOnce"},
                    {"service": "orders", "topic": "order.refunded"},
                ],
            ),
            svc(
                "reports",
                "analytics",
                ready=READY,
                subscriptions=[
                    {"service": "orders", "namespace": "shop", "topic": "order.created"}
                ],
            ),
        ],
        [
            route(
                "orders",
                "orders",
                [
                    {
                        "name": "testers",
                        "match": {"headers": {"x-canary": "always"}, "methods": ["GET"]},
                        "destinations": dest(("v2", 100)),
                        "timeout": "5s",
                    },
                    {
                        "match": {"pathPrefix": "/api"},
                        "destinations": dest(("v1", 90), ("v2", 10)),
                        "retries": {"attempts": 3},
                    },
                ],
                ready=READY,
            )
        ],
        selected=selected,
    )


LAG = {
    ("shop", "EVENTS_orders", "payments--orders--order_created"): ConsumerLag(7, 2, 1),
    # Cross-namespace: the subscriber's namespace prefixes the consumer name.
    ("shop", "EVENTS_orders", "analytics_reports--orders--order_created"): ConsumerLag(0, 0, 0),
}


def test_status_of_one_namespace_renders_every_section() -> None:
    mesh = view.build(shop_snapshot(["shop"]), LAG, "from nats://nats:4222")
    assert mesh.render(all_namespaces=False) == EXPECTED_SHOP


EXPECTED_SHOP = """\
SERVICES
NAME        SERVICE    VERSION   READY                 ENDPOINTS   SUBJECT
gateway     gateway    v1        True                  2           -
orders      orders     v1        True                  3           -
orders-v2   orders     v2        False (NoEndpoints)   0           -
payments    payments   v1        True                  -           -

CALLERS
SERVICE    ALLOWED CALLERS
gateway    none
orders     analytics/reports, shop/gateway, shop/ghost (admits nobody: no such NatsService)
payments   shop/*

ROUTES
ROUTE    SERVICE   RULE      MATCH                 DESTINATIONS    TIMEOUT   RETRIES   READY
orders   orders    testers   GET x-canary=always   v2=100%         5s        -         True
orders   orders    #2        /api*                 v1=90% v2=10%   15s       3x

EVENTS
PUBLISHER                      TOPIC             SUBSCRIBER          DELIVERY      PENDING   ACK PENDING   REDELIVERED
orders                         order.cancelled   -                   -             -         -             -
orders                         order.created     analytics/reports   atLeastOnce   0         0             0
orders                         order.created     shop/payments       exactlyOnce   7         2             1
orders (does not publish it)   order.refunded    shop/payments       atLeastOnce   -         -             -

lag: from nats://nats:4222
"""  # noqa: E501


def test_all_namespaces_adds_the_namespace_column_and_other_namespaces() -> None:
    text = view.build(shop_snapshot(), None, "").render(all_namespaces=True)
    lines = [line.split() for line in text.splitlines()]
    assert ["NAMESPACE", "NAME", "SERVICE", "VERSION", "READY", "ENDPOINTS", "SUBJECT"] in lines
    assert ["analytics", "reports", "reports", "v1", "True", "-", "-"] in lines
    assert ["analytics", "reports", "analytics/*"] in lines
    # Lag not asked: dashes, and no lag line.
    assert [
        "shop",
        "orders",
        "order.created",
        "shop/payments",
        "exactlyOnce",
        "-",
        "-",
        "-",
    ] in lines
    assert "lag:" not in text


def test_a_consumer_nats_did_not_report_shows_a_question_mark() -> None:
    rows = view.event_rows(shop_snapshot(["shop"]), {})
    assert [(r.subscriber, r.pending) for r in rows if r.topic == "order.created"] == [
        ("analytics/reports", "?"),
        ("shop/payments", "?"),
    ]


def test_a_grant_to_a_refused_claimant_admits_nobody() -> None:
    snap = snapshot(
        [
            svc("orders", same_namespace=False, callers=[{"name": "copycat"}], labels={"a": "1"}),
            svc("gateway", labels={"a": "2"}, created="2026-01-01T00:00:00Z"),
            # Claims gateway's subject later: refused, holds no user.
            svc("copycat", service="gateway", labels={"a": "3"}, created="2026-01-02T00:00:00Z"),
        ]
    )
    rows = {r.service: r.callers for r in view.caller_rows(snap)}
    assert rows["orders"] == ("shop/copycat (admits nobody: refused NatsService)",)


def test_json_has_the_same_rows() -> None:
    data = view.build(shop_snapshot(["shop"]), LAG, "from x").to_json()
    assert [s["name"] for s in data["services"]] == ["gateway", "orders", "orders-v2", "payments"]
    assert data["callers"][1]["callers"][0] == "analytics/reports"
    assert data["routes"][1]["destinations"] == "v1=90% v2=10%"
    created = next(e for e in data["events"] if e["subscriber"] == "shop/payments")
    assert (created["pending"], created["ack_pending"], created["redelivered"]) == ("7", "2", "1")
    assert data["lagNote"] == "from x"
