"""The chart's PromQL (Grafana dashboard and alert rules) as queries a test can run.

``dashboard_queries`` substitutes the dashboard's variables the way Grafana
would for one namespace; ``rule_queries`` takes each alert's expression up to
its threshold (``X > 0.05 and ...`` -> ``X``), so a healthy mesh still
answers it; ``selectors`` lists the metric selectors inside an expression.
``scrape_targets`` points a Prometheus at emulated pods with the labels the
chart's PodMonitor and ServiceMonitor would give them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.podsim import SimPod
from tests.fixtures.prometheus import Target

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CHART_FILES = REPO / "charts" / "natsmesh" / "files"
DASHBOARD = CHART_FILES / "dashboards" / "natsmesh.json"
RULES = CHART_FILES / "alerts" / "natsmesh.rules.yaml"
#: What Grafana puts for ``$__rate_interval`` at a 1 s scrape: a window with samples.
RATE_INTERVAL = "1m"

_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_OPEN, _CLOSE = "([{", ")]}"
_SELECTOR = re.compile(r"\bnatsmesh_(?:sidecar|operator)_[a-z_]+(?:\{[^}]*\})?")


def dashboard_queries(namespace: str) -> list[tuple[str, str]]:
    """(panel title, expression) of every target of the dashboard, variables filled in."""
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = str(target["expr"])
            expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$namespace", namespace)
            out.append((str(panel["title"]), expr))
    return out


def alert_rules() -> Iterator[dict[str, Any]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        yield from group["rules"]


def rule_queries() -> list[tuple[str, str]]:
    """(alert name, its expression before the threshold) of every alert we ship."""
    return [(str(r["alert"]), before_threshold(str(r["expr"]))) for r in alert_rules()]


def before_threshold(expr: str) -> str:
    """``expr`` up to its first comparison outside brackets and strings.

    ``(a / b) > 0.05 and c > 1`` -> ``(a / b)``; ``{status=~"5.."}`` or
    ``(x > 0) - time() < y`` keep their inner comparisons. An expression
    without one comes back whole.
    """
    depth = 0
    quote = ""
    i = 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'`":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        elif depth == 0 and any(expr.startswith(op, i) for op in _COMPARISONS):
            return expr[:i].strip()
        i += 1
    return expr.strip()


def selectors(expr: str) -> set[str]:
    """The ``natsmesh_*`` metric selectors (name and matchers) in ``expr``."""
    return set(_SELECTOR.findall(expr))


def scrape_targets(
    namespace: str, shop_pods: Iterable[SimPod], operator_pods: Iterable[SimPod]
) -> list[Target]:
    """The sidecars' admin ports and the operators' metrics ports, labelled like the monitors'.

    The PodMonitor's ``mesh-admin`` port, ``namespace`` and ``pod``, and
    ``natsmesh_service`` (the webhook's ``natsmesh.io/service`` annotation:
    the sidecar's NATSMESH_SERVICE); the ServiceMonitor's ``metrics`` port.
    """
    targets = []
    for pod in shop_pods:
        service = pod.container("natsmesh-sidecar").env["NATSMESH_SERVICE"]
        targets.append(
            Target(
                "natsmesh-sidecars",
                f"127.0.0.1:{_port(pod, 'mesh-admin')}",
                {"namespace": namespace, "pod": pod.name, "natsmesh_service": service},
            )
        )
    for pod in operator_pods:
        targets.append(
            Target(
                "natsmesh-operator",
                f"127.0.0.1:{_port(pod, 'metrics')}",
                {"namespace": pod.namespace, "pod": pod.name},
            )
        )
    return targets


def _port(pod: SimPod, name: str) -> int:
    port = pod.container_port(name)
    assert port is not None, f"pod {pod.name} names no port {name}"
    return pod.port(port)
