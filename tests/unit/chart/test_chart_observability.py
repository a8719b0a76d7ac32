"""ServiceMonitor / PodMonitor and the Grafana dashboard ConfigMap."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from natsmesh_operator.metrics import OperatorMetrics
from natsmesh_sidecar.observe.metrics import Metrics

from .render import FULLNAME, NAMESPACE, render
from .values_sets import VALUE_SETS

pytestmark = pytest.mark.unit

SIDECAR_METRICS = {
    "natsmesh_sidecar_requests_total",
    "natsmesh_sidecar_request_duration_seconds",
    "natsmesh_sidecar_inflight_requests",
    "natsmesh_sidecar_retries_total",
    "natsmesh_sidecar_circuit_state",
    "natsmesh_sidecar_circuit_refused_total",
    "natsmesh_sidecar_events_published_total",
    "natsmesh_sidecar_events_delivered_total",
    "natsmesh_sidecar_events_dead_lettered_total",
    "natsmesh_sidecar_nats_connected",
    "natsmesh_sidecar_events_pending",
    "natsmesh_sidecar_creds_expiry_timestamp_seconds",
}
OPERATOR_METRICS = {
    "natsmesh_operator_reconciles_total",
    "natsmesh_operator_reconcile_duration_seconds",
    "natsmesh_operator_managed_objects",
    "natsmesh_operator_webhook_admissions_total",
    "natsmesh_operator_webhook_duration_seconds",
}


def test_monitors_off_by_default() -> None:
    manifest = render()
    assert not manifest.has("ServiceMonitor")
    assert not manifest.has("PodMonitor")
    assert not any(d["metadata"]["name"].endswith("-dashboard") for d in manifest.docs)


def test_service_monitor_for_the_operator() -> None:
    manifest = render(
        {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
    )
    monitor = manifest.get("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    service = manifest.get("Service", f"{FULLNAME}-metrics")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    # Selects only the metrics Service, not the webhook Service.
    webhook = manifest.get("Service", f"{FULLNAME}-webhook")
    assert (
        not monitor["spec"]["selector"]["matchLabels"].items()
        <= webhook["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"


def test_pod_monitor_for_the_sidecars() -> None:
    monitor = render(VALUE_SETS["service-monitor"]).get("PodMonitor")
    assert monitor["spec"]["selector"] == {"matchLabels": {"natsmesh.io/injected": "true"}}
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "mesh-admin"
    assert endpoint["path"] == "/metrics"


def _dashboard() -> dict[str, Any]:
    config_map = render(VALUE_SETS["dashboard"]).get("ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard: dict[str, Any] = json.loads(config_map["data"]["natsmesh.json"])
    return dashboard


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _exposed() -> set[str]:
    """Every family name the sidecar and the operator expose (counters with _total)."""
    names = {f.name for f in Metrics().registry.families}
    for family in OperatorMetrics().registry.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_dashboard_covers_every_metric() -> None:
    used = set()
    for expr in _exprs(_dashboard()):
        used |= set(re.findall(r"natsmesh_(?:sidecar|operator)_[a-z_]+", expr))
    base = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert base >= SIDECAR_METRICS | OPERATOR_METRICS
    assert base <= SIDECAR_METRICS | OPERATOR_METRICS, base - SIDECAR_METRICS - OPERATOR_METRICS
    # Names the code really exposes (a wrong one reads "no data" in Grafana);
    # labels are checked against a real scrape in tests/e2e/test_e2e_shop.py.
    assert base <= _exposed(), base - _exposed()


def test_dashboard_panels() -> None:
    dashboard = _dashboard()
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Request rate", "Error rate (5xx share)", "Latency p50", "Latency p99"} <= titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = _exprs(dashboard)
    assert any("histogram_quantile(0.99" in e and "by (le, destination)" in e for e in exprs)
    assert any("histogram_quantile(0.5," in e and "by (le, destination)" in e for e in exprs)
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace"}
