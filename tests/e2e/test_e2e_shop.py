"""The shop end to end on the local control plane, pods emulated by tests/e2e/podsim.py.

The operator (and its webhooks) runs as a local process against the cluster in
NATSMESH_KUBECONFIG (tests/fixtures/operator.py); the shop's NatsServices,
NatsRoutes and Deployments are applied; the pods the Deployments create get the
sidecar injected by the real API server, land on kwok nodes, and their sidecar
and app containers run here as processes with the env, args and Secret
contents their pod spec names. Traffic enters at the gateway app, as from an
ingress.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator

import pytest

from tests.e2e import shop as scenarios
from tests.e2e.podsim import PodSim, SimPod
from tests.fixtures.cluster import tool
from tests.fixtures.operator import OperatorProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        bool(os.environ.get("NATSMESH_E2E_KIND")),
        reason="NATSMESH_E2E_KIND is set: the kind flavour (test_e2e_kind.py) runs instead",
    ),
]

SIDECAR = "natsmesh-sidecar"
MESH_RESOURCES = len(scenarios.WORKLOADS) + 2  # the NatsServices and two NatsRoutes


def all_ready(op: OperatorProcess, namespace: str) -> bool:
    items = json.loads(
        op.cluster.kubectl("get", "natsservices,natsroutes", "-n", namespace, "-o", "json").stdout
    )["items"]
    return len(items) == MESH_RESOURCES and all(
        any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in i.get("status", {}).get("conditions", [])
        )
        for i in items
    )


class LocalShop(scenarios.ShopEndpoints):
    sim: PodSim
    pods: dict[str, SimPod]


@pytest.fixture(scope="module")
def shop(
    mesh_operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalShop]:
    cluster = mesh_operator.cluster
    # Inside the operator's scope: it manages only the namespaces named <scope>-*.
    ns = f"{mesh_operator.scope}-e2e-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("label", "namespace", ns, "natsmesh.io/inject=enabled")
    sim = PodSim(
        [tool("kubectl"), "--kubeconfig", str(cluster.kubeconfig)],
        ns,
        tmp_path_factory.mktemp("pods"),
    )
    try:
        cluster.kubectl("apply", "-n", ns, "-f", str(scenarios.SHOP))
        mesh_operator.wait_for(
            "the shop's mesh resources Ready", lambda: all_ready(mesh_operator, ns)
        )
        # After the NatsServices: the webhook injects pods of services it knows.
        cluster.kubectl("apply", "-n", ns, "-f", str(scenarios.SHOP_APPS))
        sim.start()
        pods: dict[str, SimPod] = {}
        for resource, labels in scenarios.WORKLOADS.items():
            (pod,) = sim.wait_ready(1, timeout=60, **labels)
            pods[resource] = pod
        endpoints = LocalShop(
            namespace=ns,
            gateway=pods["gateway"].url(8080),
            outbound=lambda w: pods[w].url(15001),
            admin=lambda w: pods[w].url(15020),
            app=lambda w: pods[w].url(
                int(pods[w].container("app").spec["ports"][0]["containerPort"])
            ),
        )
        endpoints.sim = sim
        endpoints.pods = pods
        scenarios.warm_up(endpoints)
        yield endpoints
        # Nothing crashed or restarted while the tests ran.
        assert all(p.restarts() == 0 for p in pods.values()), sim.describe()
    finally:
        sim.stop()
        cluster.kubectl(
            "delete",
            "natsservices,natsroutes",
            "--all",
            "-n",
            ns,
            "--timeout=60s",
            check=False,
            timeout=90,
        )
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_pods_run_the_injected_spec(shop: LocalShop) -> None:
    """Every shop pod got the sidecar, and the emulated processes run what it names."""
    for resource, pod in shop.pods.items():
        assert pod.has_sidecar(SIDECAR), pod.spec
        sidecar = pod.container(SIDECAR)
        env = sidecar.env
        service = "orders" if resource == "orders-v2" else resource
        assert env["NATSMESH_SERVICE"] == service
        assert env["NATSMESH_NAMESPACE"] == shop.namespace
        assert env["NATSMESH_VERSION"] == ("v2" if resource == "orders-v2" else "v1")
        # The creds Secret of this NatsService, mounted where the spec says.
        creds = env["NATSMESH_CREDS_FILE"]
        assert creds.startswith(str(pod.dir))
        assert creds.endswith("/user.creds")
        with open(creds) as f:
            assert "BEGIN NATS USER JWT" in f.read()
        volumes = {v["name"]: v for v in pod.spec["volumes"]}
        assert volumes["natsmesh-creds"]["secret"]["secretName"] == f"natsmesh-{resource}-creds"
        app = pod.container("app")
        assert app.argv[-1] == ("orders" if resource.startswith("orders") else resource)
        assert app.env["PORT"] == env["NATSMESH_APP_PORT"]
        assert app.env["NATSMESH_OUTBOUND"].endswith(":" + env["NATSMESH_LISTEN_PORT"])


def test_traffic_flows_gateway_orders_payments(shop: LocalShop) -> None:
    scenarios.check_chain(shop)


def test_forbidden_calls_are_403(shop: LocalShop) -> None:
    scenarios.check_denied(shop)


def test_canary_split_is_90_10(shop: LocalShop) -> None:
    scenarios.check_canary(shop)


def test_event_delivered_exactly_once_after_a_failure(shop: LocalShop) -> None:
    scenarios.check_event_once(shop)


def test_metrics_count_requests(shop: LocalShop) -> None:
    scenarios.check_metrics(shop)
