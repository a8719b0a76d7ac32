"""Per-NatsService NetworkPolicies on the real API server: made, repaired, removed, switchable.

What is shown here is the object the API server stores; that a CNI then
drops traffic to the app's port is not: the local control plane has no pod
network, let alone one that enforces NetworkPolicies.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from natsmesh_operator.handlers.policies import LABEL_APP_POLICY, policy_name
from tests.fixtures.operator import OperatorProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def service(name: str, selector: dict[str, Any], port: int = 8080) -> str:
    return json.dumps(
        {
            "apiVersion": "natsmesh.io/v1alpha1",
            "kind": "NatsService",
            "metadata": {"name": name},
            "spec": {"selector": selector, "port": port},
        }
    )


def policy(op: OperatorProcess, name: str, namespace: str) -> dict[str, Any] | None:
    out = op.cluster.kubectl(
        "get", "networkpolicy", policy_name(name), "-n", namespace, "-o", "json", check=False
    )
    if out.returncode != 0:
        return None
    obj: dict[str, Any] = json.loads(out.stdout)
    return obj


def policies(op: OperatorProcess, namespace: str) -> set[str]:
    out = op.cluster.kubectl(
        "get", "networkpolicy", "-n", namespace, "-l", f"{LABEL_APP_POLICY}=true", "-o", "json"
    )
    return {p["metadata"]["name"] for p in json.loads(out.stdout)["items"]}


ADMIN_ONLY = [{"ports": [{"port": 15020, "protocol": "TCP"}]}]


def test_policy_admits_only_the_admin_port_and_is_kept(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    op, ns, kubectl = mesh_operator, mesh_namespace, mesh_operator.cluster.kubectl
    selector = {
        "matchLabels": {"app": "orders"},
        "matchExpressions": [{"key": "track", "operator": "NotIn", "values": ["canary"]}],
    }
    kubectl("apply", "-n", ns, "-f", "-", input=service("orders", selector, port=9090))
    op.wait_ready("natsservice", "orders", ns)
    op.wait_for("the orders policy", lambda: policy(op, "orders", ns) is not None)
    np = policy(op, "orders", ns)
    assert np is not None
    assert np["spec"]["podSelector"] == selector
    assert np["spec"]["policyTypes"] == ["Ingress"]
    # The admin port only: the app's 9090 is not admitted from anywhere.
    assert np["spec"]["ingress"] == ADMIN_ONLY
    svc = op.get("natsservice", "orders", ns)
    (owner,) = np["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "NatsService",
        "orders",
        svc["metadata"]["uid"],
        True,
    )
    assert np["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "natsmesh"

    # Deleted by hand: back within a drift pass.
    kubectl("delete", "networkpolicy", policy_name("orders"), "-n", ns)
    op.wait_for("the policy recreated", lambda: policy(op, "orders", ns) is not None)

    # Widened by hand (the app's port opened to all): narrowed again.
    widened = [{"ports": [{"port": 15020, "protocol": "TCP"}, {"port": 9090, "protocol": "TCP"}]}]
    kubectl(
        "patch",
        "networkpolicy",
        policy_name("orders"),
        "-n",
        ns,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"ingress": widened}}),
    )
    op.wait_for(
        "the policy narrowed again",
        lambda: (p := policy(op, "orders", ns)) is not None and p["spec"]["ingress"] == ADMIN_ONLY,
    )

    # A selector change follows.
    kubectl("apply", "-n", ns, "-f", "-", input=service("orders", {"matchLabels": {"app": "o2"}}))
    op.wait_for(
        "the policy following the selector",
        lambda: (
            (p := policy(op, "orders", ns)) is not None
            and p["spec"]["podSelector"] == {"matchLabels": {"app": "o2"}}
        ),
    )

    # The NatsService goes: so does its policy (no garbage collector runs here:
    # the operator removes it itself).
    kubectl("delete", "natsservice", "orders", "-n", ns, "--timeout=30s")
    op.wait_for("the policy gone", lambda: policy(op, "orders", ns) is None)


def test_a_tenants_own_policy_is_left_alone(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    op, ns, kubectl = mesh_operator, mesh_namespace, mesh_operator.cluster.kubectl
    # Carries our label but no NatsService as controller: not ours to delete.
    own = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "tenant-own", "labels": {LABEL_APP_POLICY: "true"}},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(own))
    kubectl("apply", "-n", ns, "-f", "-", input=service("web", {"matchLabels": {"app": "web"}}))
    op.wait_for("the web policy", lambda: policy(op, "web", ns) is not None)
    kubectl("delete", "natsservice", "web", "-n", ns, "--timeout=30s")
    op.wait_for("the web policy gone", lambda: policy(op, "web", ns) is None)
    assert "tenant-own" in policies(op, ns)


def test_switched_off_no_policies_and_earlier_ones_removed(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    op, ns, kubectl = mesh_operator, mesh_namespace, mesh_operator.cluster.kubectl
    kubectl("apply", "-n", ns, "-f", "-", input=service("before", {"matchLabels": {"app": "b"}}))
    op.wait_for("the policy while on", lambda: policy(op, "before", ns) is not None)
    op.env["NATSMESH_APP_NETWORK_POLICY"] = "false"
    try:
        op.restart()
        op.wait_for("the earlier policy removed", lambda: policy(op, "before", ns) is None)
        kubectl("apply", "-n", ns, "-f", "-", input=service("after", {"matchLabels": {"app": "a"}}))
        op.wait_ready("natsservice", "after", ns)
        # Give a few drift passes (2 s apart here) the chance to (wrongly) make one.
        time.sleep(5)
        assert policies(op, ns) == set()
    finally:
        op.env.pop("NATSMESH_APP_NETWORK_POLICY", None)
        op.restart()
    # Back on: every service gets one again.
    op.wait_for(
        "policies back",
        lambda: policies(op, ns) == {policy_name("before"), policy_name("after")},
    )
