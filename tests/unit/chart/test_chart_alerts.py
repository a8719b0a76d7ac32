"""The alert rules we ship: the PrometheusRule, their shape, and promtool over them.

``promtool test rules`` runs alerts/natsmesh_rules_test.yaml: each alert fires
on a synthetic unhealthy series and not on the healthy one beside it (promtool
compares the firing set exactly, labels and rendered annotations included).
The same expressions against a real scrape of the shop:
tests/e2e/test_e2e_shop.py::test_dashboard_and_alert_queries_return_data.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.observability import RULES, alert_rules, before_threshold, selectors
from tests.fixtures.cluster import REPO, tool

from .render import FULLNAME, NAMESPACE, render
from .values_sets import VALUE_SETS

pytestmark = pytest.mark.unit

PROMTOOL_TESTS = Path(__file__).parent / "alerts" / "natsmesh_rules_test.yaml"
DOCS = REPO / "docs" / "alerts.md"
#: What the brief asked for: the golden signals and the control plane's troubles.
EXPECTED = {
    "NatsmeshHighErrorRate",
    "NatsmeshHighLatencyP99",
    "NatsmeshTrafficDropped",
    "NatsmeshCircuitOpen",
    "NatsmeshSidecarDisconnected",
    "NatsmeshReconcileErrors",
    "NatsmeshWebhookErrors",
    "NatsmeshCredsNearExpiry",
    "NatsmeshConsumerLag",
    "NatsmeshDeadLetters",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_prometheus_rule_off_by_default() -> None:
    assert not render().has("PrometheusRule")


def test_prometheus_rule_carries_the_rules_file() -> None:
    values = {"metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "prom"}}}}
    rule = render(values).get("PrometheusRule")
    assert rule["metadata"]["name"] == f"{FULLNAME}-alerts"
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "prom"
    assert rule["metadata"]["labels"]["app.kubernetes.io/component"] == "alerts"
    # One source: the chart's groups are the file's, byte for byte once parsed.
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    assert render(VALUE_SETS["prometheus-rule"]).get("PrometheusRule")["spec"]["groups"]


def test_every_alert_has_for_severity_summary_and_a_runbook() -> None:
    anchors = {
        re.sub(r"[^a-z0-9-]", "", h.lower().replace(" ", "-"))
        for h in re.findall(r"^#+ (.+)$", DOCS.read_text(), re.M)
    }
    names = []
    for rule in alert_rules():
        name = rule["alert"]
        names.append(name)
        assert re.fullmatch(r"\d+m", rule["for"]), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        notes: dict[str, Any] = rule["annotations"]
        assert notes["summary"], name
        assert notes["description"], name
        assert notes["runbook"] == f"docs/alerts.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/alerts.md has no section {name}"
    assert set(names) == EXPECTED
    assert len(names) == len(set(names))


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED)} rules found" in result.stdout, result.stdout


def test_promtool_test_rules_each_alert_fires_and_only_where_unhealthy() -> None:
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
    fired = {
        case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]
    }
    assert fired == EXPECTED
    result = promtool("test", "rules", str(PROMTOOL_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("expr", "lhs"),
    [
        ("(a / b) > 0.05\nand\nc > 1", "(a / b)"),
        ('sum(x{status=~"5..", a!="b"}) >= 2', 'sum(x{status=~"5..", a!="b"})'),
        ("(x > 0) - time() < 0.125 * (x - y)", "(x > 0) - time()"),
        ('x{l="a>b"} == 0', 'x{l="a>b"}'),
        ("rate(x[5m])", "rate(x[5m])"),
    ],
)
def test_before_threshold(expr: str, lhs: str) -> None:
    assert before_threshold(expr) == lhs


def test_every_alert_has_a_threshold_and_a_metric() -> None:
    for rule in alert_rules():
        expr = str(rule["expr"]).strip()
        lhs = before_threshold(expr)
        assert lhs, rule["alert"]
        assert lhs != expr, rule["alert"]
        assert selectors(lhs), rule["alert"]
