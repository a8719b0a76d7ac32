"""The operator Deployment honours the env/image contract with natsmesh_operator."""

from __future__ import annotations

import pytest

from natsmesh_operator.webhook.inject import InjectionSettings

from .render import FULLNAME, env, operator_container, render
from .values_sets import EXTERNAL_URL, VALUE_SETS

pytestmark = pytest.mark.unit

IN_CHART_URL = "nats://nm-natsmesh-nats.mesh.svc:4222"


def test_env_contract_with_defaults() -> None:
    container = operator_container(render())
    assert env(container) == {
        "NATSMESH_OPERATOR_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        "NATSMESH_NATS_URL": IN_CHART_URL,
        "NATSMESH_NATS_REPLICAS": "3",
        "NATSMESH_SIDECAR_NATS_URL": IN_CHART_URL,
        "NATSMESH_BOOTSTRAP_SECRET": f"{FULLNAME}-nats-bootstrap",
        "NATSMESH_SIDECAR_IMAGE": "natsmesh/sidecar:0.1.0",
        "NATSMESH_SIDECAR_IMAGE_PULL_POLICY": "IfNotPresent",
        "NATSMESH_SIDECAR_CPU_REQUEST": "10m",
        "NATSMESH_SIDECAR_MEMORY_REQUEST": "32Mi",
        "NATSMESH_SIDECAR_MEMORY_LIMIT": "64Mi",
        "NATSMESH_SIDECAR_READY_PERIOD_SECONDS": "1",
        "NATSMESH_SIDECAR_READY_FAILURE_THRESHOLD": "3",
        "NATSMESH_WEBHOOK_PORT": "9443",
        "NATSMESH_WEBHOOK_CERT_DIR": "/tls",
        "NATSMESH_METRICS_PORT": "8080",
        "NATSMESH_PEERING": "natsmesh",
        "NATSMESH_LOG_FORMAT": "json",
        "NATSMESH_API_CONNECTIONS": "32",
        "NATSMESH_CREDS_TTL_SECONDS": "86400",
        "NATSMESH_CREDS_REVOCATION_GRACE_SECONDS": "90",
        "NATSMESH_NATS_MAX_CONTROL_LINE": "16384",
        "NATSMESH_APP_NETWORK_POLICY": "true",
    }


def test_image_and_entrypoint() -> None:
    container = operator_container(render())
    assert container["image"] == "natsmesh/operator:0.1.0"
    assert container["command"] == ["python", "-m", "natsmesh_operator.cli"]
    assert container["args"] == ["operator"]


def test_values_flow_into_env() -> None:
    container = operator_container(
        render(
            {
                "image": {
                    "operator": {"repository": "reg/op", "tag": "v9"},
                    "sidecar": {"repository": "reg/sc", "tag": "v8", "pullPolicy": "Always"},
                },
                "sidecar": {
                    "natsUrl": "nats://edge:4222",
                    "resources": {"cpuRequest": "5m", "memoryLimit": "48Mi"},
                    "readiness": {"periodSeconds": 0.5, "failureThreshold": 5},
                },
                "operator": {
                    "peering": "other",
                    "logFormat": "text",
                    "apiConnections": 0,
                    "credsTTLSeconds": 3600,
                    "revocationGraceSeconds": 30,
                },
            }
        )
    )
    values = env(container)
    assert container["image"] == "reg/op:v9"
    assert values["NATSMESH_SIDECAR_IMAGE"] == "reg/sc:v8"
    assert values["NATSMESH_SIDECAR_IMAGE_PULL_POLICY"] == "Always"
    assert values["NATSMESH_SIDECAR_NATS_URL"] == "nats://edge:4222"
    assert values["NATSMESH_NATS_URL"] == IN_CHART_URL
    assert values["NATSMESH_SIDECAR_CPU_REQUEST"] == "5m"
    assert values["NATSMESH_SIDECAR_MEMORY_LIMIT"] == "48Mi"
    assert values["NATSMESH_SIDECAR_READY_PERIOD_SECONDS"] == "0.5"
    assert values["NATSMESH_SIDECAR_READY_FAILURE_THRESHOLD"] == "5"
    assert values["NATSMESH_PEERING"] == "other"
    assert values["NATSMESH_LOG_FORMAT"] == "text"
    assert values["NATSMESH_API_CONNECTIONS"] == "0"
    assert values["NATSMESH_CREDS_TTL_SECONDS"] == "3600"
    assert values["NATSMESH_CREDS_REVOCATION_GRACE_SECONDS"] == "30"


def test_external_nats_env() -> None:
    values = env(operator_container(render(VALUE_SETS["nats-external"])))
    assert values["NATSMESH_NATS_URL"] == EXTERNAL_URL
    assert values["NATSMESH_SIDECAR_NATS_URL"] == EXTERNAL_URL
    assert values["NATSMESH_BOOTSTRAP_SECRET"] == f"{FULLNAME}-nats-bootstrap"
    # The external server's size is not the in-chart StatefulSet's.
    assert values["NATSMESH_NATS_REPLICAS"] == "1"
    values = env(operator_container(render(VALUE_SETS["nats-external-secret"])))
    assert values["NATSMESH_BOOTSTRAP_SECRET"] == "my-nats-bootstrap"


def test_deployment_is_highly_available() -> None:
    manifest = render()
    deployment = manifest.get("Deployment", f"{FULLNAME}-operator")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    selector = spec["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "operator"
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    anti = pod["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"]
    spread = pod["topologySpreadConstraints"][0]
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == selector
    pdb = manifest.get("PodDisruptionBudget", f"{FULLNAME}-operator")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == selector


def test_single_replica_without_pdb() -> None:
    manifest = render(VALUE_SETS["operator-single-no-pdb"])
    assert manifest.get("Deployment")["spec"]["replicas"] == 1
    assert all(
        p["metadata"]["name"] != f"{FULLNAME}-operator" for p in manifest.all("PodDisruptionBudget")
    )


def test_probes_ports_and_mounts() -> None:
    manifest = render()
    container = operator_container(manifest)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"webhook": 9443, "metrics": 8080}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["webhook-tls"]["mountPath"] == "/tls"
    assert mounts["webhook-tls"]["readOnly"]
    volumes = {
        v["name"]: v for v in manifest.get("Deployment")["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["webhook-tls"]["secret"]["secretName"] == f"{FULLNAME}-webhook-tls"
    assert "emptyDir" in volumes["tmp"]


def test_metrics_service() -> None:
    service = render().get("Service", f"{FULLNAME}-metrics")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_peering_object_is_a_release_object() -> None:
    """Not a hook: helm uninstall deletes release objects, never hook objects."""
    peering = render().get("ClusterKopfPeering")
    assert peering["apiVersion"] == "kopf.dev/v1"
    assert peering["metadata"]["name"] == "natsmesh"
    assert "helm.sh/hook" not in (peering["metadata"].get("annotations") or {})
    assert peering["metadata"]["labels"]["app.kubernetes.io/instance"]
    assert (
        render({"operator": {"peering": "other"}}).get("ClusterKopfPeering")["metadata"]["name"]
        == "other"
    )


def test_pod_scheduling_values() -> None:
    pod = render(VALUE_SETS["everything-on"]).get("Deployment")["spec"]["template"]
    assert pod["metadata"]["labels"]["a"] == "b"
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def test_the_operators_own_sidecar_defaults_are_the_charts() -> None:
    """An operator run without the chart (``natsmesh operator`` by hand)
    injects the same sidecar the chart's defaults describe."""
    values = env(operator_container(render()))
    code = InjectionSettings()
    assert values["NATSMESH_SIDECAR_CPU_REQUEST"] == code.cpu_request
    assert values["NATSMESH_SIDECAR_MEMORY_REQUEST"] == code.memory_request
    assert values["NATSMESH_SIDECAR_MEMORY_LIMIT"] == code.memory_limit
    assert values["NATSMESH_SIDECAR_IMAGE_PULL_POLICY"] == code.image_pull_policy
