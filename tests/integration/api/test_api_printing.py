"""What a person sees with kubectl: printer columns, categories, the status
subresource, field selectors, server-side defaults and `kubectl explain`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.cluster import Cluster

REPO = Path(__file__).resolve().parents[3]

READY = {
    "type": "Ready",
    "status": "True",
    "reason": "Wired",
    "message": "user, stream and consumers are in place",
    "lastTransitionTime": "2026-01-01T00:00:00Z",
    "observedGeneration": 1,
}

pytestmark = pytest.mark.integration


@pytest.fixture
def shop(crds: Cluster, namespace: str) -> str:
    """The shop examples stored in a fresh namespace."""
    crds.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "shop"))
    return namespace


def patch_status(cluster: Cluster, namespace: str, kind: str, name: str, status: object) -> None:
    cluster.kubectl(
        "patch",
        kind,
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def table(cluster: Cluster, *args: str) -> list[list[str]]:
    out = cluster.kubectl("get", *args).stdout
    return [line.split() for line in out.strip().splitlines()]


def test_kubectl_get_nsvc_prints_the_columns(crds: Cluster, shop: str) -> None:
    subject = f"mesh.{shop}.orders.v1"
    patch_status(
        crds, shop, "nsvc", "orders", {"conditions": [READY], "subject": subject, "endpoints": 2}
    )
    rows = table(crds, "nsvc", "-n", shop)
    assert rows[0] == ["NAME", "READY", "SUBJECT", "ENDPOINTS", "AGE"]
    orders = next(r for r in rows if r[0] == "orders")
    assert orders[1:4] == ["True", subject, "2"]
    assert {r[0] for r in rows[1:]} == {"gateway", "inventory", "orders", "orders-v2", "payments"}

    wide = table(crds, "nsvc", "-n", shop, "-o", "wide")
    assert wide[0] == ["NAME", "READY", "SUBJECT", "ENDPOINTS", "AGE", "SERVICE", "VERSION", "PORT"]


def test_kubectl_get_nroute_prints_the_columns(crds: Cluster, shop: str) -> None:
    patch_status(crds, shop, "nroute", "orders", {"conditions": [READY], "ruleCount": 2})
    rows = table(crds, "nroute", "-n", shop)
    assert rows[0] == ["NAME", "SERVICE", "RULES", "READY", "AGE"]
    orders = next(r for r in rows if r[0] == "orders")
    assert orders[1:4] == ["orders", "2", "True"]


def test_kubectl_get_natsmesh_lists_both_kinds(crds: Cluster, shop: str) -> None:
    out = crds.kubectl("get", "natsmesh", "-n", shop, "-o", "name").stdout.split()
    assert "natsservice.natsmesh.io/orders" in out
    assert "natsroute.natsmesh.io/orders" in out
    assert len(out) == 7


def test_server_applies_defaults(crds: Cluster, shop: str) -> None:
    body = json.loads(crds.kubectl("get", "nsvc", "gateway", "-n", shop, "-o", "json").stdout)
    assert body["spec"]["version"] == "v1"
    inventory = json.loads(
        crds.kubectl("get", "nsvc", "inventory", "-n", shop, "-o", "json").stdout
    )
    stream = inventory["spec"]["events"]["stream"]
    assert stream == {
        "storage": "memory",
        "maxAge": "1h",
        "maxMsgs": 100000,
        "retention": "limits",
        "replicas": 1,
    }
    assert inventory["spec"]["events"]["subscriptions"][0]["delivery"] == "atLeastOnce"
    route = json.loads(crds.kubectl("get", "nroute", "orders", "-n", shop, "-o", "json").stdout)
    assert route["spec"]["rules"][0]["destinations"][0]["weight"] == 100
    assert route["spec"]["rules"][1]["retries"]["retryNonIdempotent"] is False


def test_status_is_a_subresource_and_validated(crds: Cluster, shop: str) -> None:
    # A spec change through the status subresource is ignored ...
    crds.kubectl(
        "patch",
        "nsvc",
        "orders",
        "-n",
        shop,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"port": 9999}, "status": {"endpoints": 1}}),
    )
    body = json.loads(crds.kubectl("get", "nsvc", "orders", "-n", shop, "-o", "json").stdout)
    assert (body["spec"]["port"], body["status"]["endpoints"]) == (8080, 1)
    # ... and the status has a schema too.
    proc = crds.kubectl(
        "patch",
        "nsvc",
        "orders",
        "-n",
        shop,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"conditions": [{**READY, "status": "Maybe"}]}}),
        check=False,
    )
    assert proc.returncode != 0
    assert "status.conditions[0].status" in proc.stderr
    assert 'Unsupported value: "Maybe"' in proc.stderr


def test_field_selectors(crds: Cluster, shop: str) -> None:
    routes = crds.kubectl(
        "get", "nroute", "-n", shop, "--field-selector", "spec.service=payments", "-o", "name"
    ).stdout.split()
    assert routes == ["natsroute.natsmesh.io/payments"]
    canaries = crds.kubectl(
        "get", "nsvc", "-n", shop, "--field-selector", "spec.version=v2", "-o", "name"
    ).stdout.split()
    assert canaries == ["natsservice.natsmesh.io/orders-v2"]


def test_kubectl_explain_shows_the_model_docs(crds: Cluster) -> None:
    out = crds.kubectl("explain", "nsvc.spec.events.subscriptions.delivery").stdout
    assert "atMostOnce" in out
    assert "redelivered otherwise" in out
