"""The mutating webhook injects the sidecar through the real API server; rollouts pick it up."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from natsmesh_operator.webhook import inject
from tests.fixtures.operator import OperatorProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def service(name: str, labels: dict[str, str], port: int = 8080) -> str:
    return json.dumps(
        {
            "apiVersion": "natsmesh.io/v1alpha1",
            "kind": "NatsService",
            "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": labels}, "port": port},
        }
    )


def deployment(name: str, labels: dict[str, str], annotations: dict[str, str] | None = None) -> str:
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels, "annotations": annotations or {}},
                    "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]},
                },
            },
        }
    )


def pods(op: OperatorProcess, namespace: str, selector: str) -> list[dict[str, Any]]:
    out = op.cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def sidecar_of(pod: dict[str, Any]) -> dict[str, Any] | None:
    for c in pod["spec"].get("initContainers", []):
        if c["name"] == inject.SIDECAR_NAME:
            return cast(dict[str, Any], c)
    return None


def test_new_deployment_gets_the_sidecar_field_by_field(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    ns, kubectl = mesh_namespace, mesh_operator.cluster.kubectl
    kubectl("apply", "-n", ns, "-f", "-", input=service("orders", {"app": "orders"}, port=9090))
    mesh_operator.wait_ready("natsservice", "orders", ns)
    kubectl("apply", "-n", ns, "-f", "-", input=deployment("orders", {"app": "orders"}))
    mesh_operator.wait_for("an orders pod", lambda: bool(pods(mesh_operator, ns, "app=orders")))
    pod = pods(mesh_operator, ns, "app=orders")[0]
    sidecar = sidecar_of(pod)
    assert sidecar is not None, pod["spec"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == "natsmesh/sidecar:test"
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env["NATSMESH_SERVICE"] == "orders"
    assert env["NATSMESH_NAMESPACE"] == ns
    assert env["NATSMESH_APP_PORT"] == "9090"
    assert env["NATSMESH_NATS_URL"] == mesh_operator.nats.url
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == inject.CREDS_VOLUME)
    assert volume["secret"]["secretName"] == "natsmesh-orders-creds"
    assert pod["metadata"]["labels"][inject.LABEL_INJECTED] == "true"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app"]
    assert "HTTP_PROXY" not in {e["name"] for e in pod["spec"]["containers"][0].get("env", [])}
    # The pod is scheduled and Running on a kwok node like any other.
    mesh_operator.wait_for(
        "the pod Running",
        lambda: pods(mesh_operator, ns, "app=orders")[0]["status"].get("phase") == "Running",
    )


def test_a_pure_clients_sidecar_is_not_gated_on_its_app(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    """A NatsService that admits nobody and subscribes to nothing (a load
    generator, a cron job): its app listens on no port, and its sidecar gets
    the check ``none``; a served service keeps the TCP default beside it."""
    ns, kubectl = mesh_namespace, mesh_operator.cluster.kubectl
    client = json.loads(service("loadgen", {"app": "loadgen"}))
    client["spec"]["allowSameNamespace"] = False
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(client))
    kubectl("apply", "-n", ns, "-f", "-", input=service("orders", {"app": "orders"}))
    mesh_operator.wait_ready("natsservice", "loadgen", ns)
    mesh_operator.wait_ready("natsservice", "orders", ns)
    for name in ("loadgen", "orders"):
        kubectl("apply", "-n", ns, "-f", "-", input=deployment(name, {"app": name}))
    checks: dict[str, str | None] = {}
    for name in ("loadgen", "orders"):
        selector = f"app={name}"

        def created(selector: str = selector) -> bool:
            return bool(pods(mesh_operator, ns, selector))

        mesh_operator.wait_for(f"a {name} pod", created)
        sidecar = sidecar_of(pods(mesh_operator, ns, selector)[0])
        assert sidecar is not None
        checks[name] = {e["name"]: e["value"] for e in sidecar["env"]}.get("NATSMESH_READY_CHECK")
    assert checks == {"loadgen": "none", "orders": None}  # None: the sidecar's TCP default


def test_opt_out_and_proxy_env_annotations(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    ns, kubectl = mesh_namespace, mesh_operator.cluster.kubectl
    kubectl("apply", "-n", ns, "-f", "-", input=service("web", {"app": "web"}))
    kubectl("apply", "-n", ns, "-f", "-", input=service("batch", {"app": "batch"}))
    mesh_operator.wait_ready("natsservice", "batch", ns)
    kubectl(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input=deployment("web", {"app": "web"}, {inject.ANNOTATION_PROXY_ENV: "true"}),
    )
    kubectl(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input=deployment("batch", {"app": "batch"}, {inject.ANNOTATION_INJECT: "false"}),
    )
    mesh_operator.wait_for(
        "both pods",
        lambda: (
            bool(pods(mesh_operator, ns, "app=web")) and bool(pods(mesh_operator, ns, "app=batch"))
        ),
    )
    web = pods(mesh_operator, ns, "app=web")[0]
    env = {e["name"]: e["value"] for e in web["spec"]["containers"][0]["env"]}
    assert env["HTTP_PROXY"] == "http://127.0.0.1:15001"
    assert sidecar_of(pods(mesh_operator, ns, "app=batch")[0]) is None


def test_existing_deployment_is_restarted_to_get_the_sidecar(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    ns, kubectl = mesh_namespace, mesh_operator.cluster.kubectl
    kubectl("apply", "-n", ns, "-f", "-", input=deployment("legacy", {"app": "legacy"}))
    mesh_operator.wait_for("a legacy pod", lambda: bool(pods(mesh_operator, ns, "app=legacy")))
    assert sidecar_of(pods(mesh_operator, ns, "app=legacy")[0]) is None
    kubectl("apply", "-n", ns, "-f", "-", input=service("legacy", {"app": "legacy"}))
    mesh_operator.wait_for(
        "the restarted pod with the sidecar",
        lambda: any(sidecar_of(p) for p in pods(mesh_operator, ns, "app=legacy")),
        timeout=60,
    )
    dep = mesh_operator.get("deployment", "legacy", ns)
    assert "natsmesh.io/restartedAt" in dep["spec"]["template"]["metadata"]["annotations"]


def test_overlapping_selectors_are_refused(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    ns, kubectl = mesh_namespace, mesh_operator.cluster.kubectl
    kubectl("apply", "-n", ns, "-f", "-", input=service("a", {"app": "x"}))
    refused = kubectl(
        "apply", "-n", ns, "-f", "-", input=service("b", {"app": "x", "tier": "web"}), check=False
    )
    assert refused.returncode != 0
    assert "spec.selector overlaps NatsService 'a'" in refused.stderr
    kubectl("apply", "-n", ns, "-f", "-", input=service("c", {"app": "y"}))  # disjoint: fine


def test_route_to_missing_service_is_a_warning_not_a_refusal(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    route = {
        "apiVersion": "natsmesh.io/v1alpha1",
        "kind": "NatsRoute",
        "metadata": {"name": "ghost"},
        "spec": {"service": "ghost", "rules": [{"destinations": [{"version": "v1"}]}]},
    }
    out = mesh_operator.cluster.kubectl(
        "apply", "-n", mesh_namespace, "-f", "-", input=json.dumps(route)
    )
    assert "no NatsService serves 'ghost'" in out.stderr
