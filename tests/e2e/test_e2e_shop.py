"""The shop end to end on the local control plane, with the chart installed by helm.

``helm install`` puts charts/natsmesh into a fresh namespace of the cluster in
NATSMESH_KUBECONFIG (tests/e2e/local.py): its pods land on kwok nodes and run
here as processes with the env, args, volumes and service-account token their
pod spec names (tests/e2e/podsim.py): the bootstrap hook Job, one NATS server
configured from the bootstrap Secret, and two operator replicas sharing the
work through kopf peering. The API server calls the chart's webhooks through
their Service (tests/e2e/netsim.py), presenting its client certificate from
the admission configuration hack/cluster.sh gives it: the release requires it
(webhook.clientAuth), so a pod that forges an AdmissionReview is refused.
Then the shop's NatsServices, NatsRoutes
and Deployments are applied; their pods get the sidecar from the chart's
webhook and run emulated too. Traffic enters at the gateway app, as from an
ingress. The last test uninstalls the release and checks what is left.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from natsmesh_operator.webhook.certgen import make_client_certs
from tests.e2e import observability
from tests.e2e import shop as scenarios
from tests.e2e.local import (
    LOCAL_ONLY,
    MESH_CRDS,
    RELEASE,
    LocalRelease,
    local_release,
)
from tests.e2e.podsim import PodSim, SimPod
from tests.fixtures import admission
from tests.fixtures.cluster import Cluster, nats_service, tool
from tests.fixtures.prometheus import Prometheus, prometheus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180), LOCAL_ONLY]

SIDECAR = "natsmesh-sidecar"
#: The shop's workloads here: with the optional gRPC service (kind runs without it).
WORKLOADS = {**scenarios.WORKLOADS, **scenarios.GRPC_WORKLOADS}
MESH_RESOURCES = len(WORKLOADS) + 2  # the NatsServices and two NatsRoutes
OPERATOR = {"app.kubernetes.io/component": "operator"}


#: The webhook answers only the API server's client certificate (CN from
#: hack/cluster.sh), signed by the CA in this Secret of the release namespace.
CLIENT_CA_SECRET = "apiserver-webhook-client-ca"
API_SERVER_CN = "kube-apiserver-webhook-client"
CLIENT_AUTH = (
    "webhook.clientAuth.enabled=true",
    f"webhook.clientAuth.caSecret.name={CLIENT_CA_SECRET}",
    f"webhook.clientAuth.allowedNames[0]={API_SERVER_CN}",
)


@pytest.fixture(scope="module")
def release(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRelease]:
    with local_release(cluster, "natsmesh-e2e", tmp_path_factory.mktemp("pods")) as release:
        release.kubectl(
            "create", "secret", "generic", CLIENT_CA_SECRET, "-n", release.namespace,
            f"--from-file=ca.crt={cluster.webhook_client / 'ca.crt'}",
        )  # fmt: skip
        release.install_running(*CLIENT_AUTH)
        yield release


class LocalShop(scenarios.ShopEndpoints):
    sim: PodSim
    pods: dict[str, SimPod]


@pytest.fixture(scope="module")
def shop(release: LocalRelease) -> Iterator[LocalShop]:
    ns = f"shop-e2e-{uuid.uuid4().hex[:6]}"
    release.kubectl("create", "namespace", ns)
    release.kubectl("label", "namespace", ns, "natsmesh.io/inject=enabled")
    sim = release.watch(ns)
    try:
        release.kubectl("apply", "-n", ns, "-f", str(scenarios.SHOP))
        release.kubectl("apply", "-n", ns, "-f", str(scenarios.SHOP_GRPC))
        release.wait_for(
            "the shop's mesh resources Ready",
            lambda: release.ready_count(ns) == MESH_RESOURCES,
        )
        # After the NatsServices: the webhook injects pods of services it knows.
        release.kubectl("apply", "-n", ns, "-f", str(scenarios.SHOP_APPS))
        release.kubectl("apply", "-n", ns, "-f", str(scenarios.SHOP_GRPC_APPS))
        pods: dict[str, SimPod] = {}
        for resource, labels in WORKLOADS.items():
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
        release.kubectl(
            "delete", "natsservices,natsroutes", "--all", "-n", ns, "--timeout=60s",
            check=False, timeout=90,
        )  # fmt: skip
        release.kubectl("delete", "namespace", ns, "--wait=false", check=False)


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
        # The NatsService's protocol tells the sidecar how to call its app.
        grpc = resource in scenarios.GRPC_WORKLOADS
        assert env["NATSMESH_APP_PROTOCOL"] == ("grpc" if grpc else "http")
        app = pod.container("app")
        role = "orders" if resource.startswith("orders") else resource
        assert app.argv[-1] == (f"examples.apps.{resource}" if grpc else role)
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


def test_file_upload_streams_through_the_shop(shop: LocalShop) -> None:
    scenarios.check_upload(shop)


def test_order_status_feed_arrives_event_by_event(shop: LocalShop) -> None:
    scenarios.check_order_status_feed(shop)


def test_websocket_echo_through_the_shop(shop: LocalShop) -> None:
    scenarios.check_websocket_echo(shop)


def test_grpc_unary_and_server_stream_through_the_shop(shop: LocalShop) -> None:
    scenarios.check_grpc_stock(shop)


def test_dashboard_and_alert_queries_return_data(
    release: LocalRelease, shop: LocalShop, tmp_path: Path
) -> None:
    """A real Prometheus scrapes the shop's sidecars and both operator replicas
    after the traffic above (and a chaos burst for some 5xx): every query of the
    chart's dashboard, every alert's expression up to its threshold and every
    metric selector in them returns data, and every rule evaluates cleanly.
    A metric or label the code does not expose shows up here as no data."""
    # A counter's first sample is rate()'s baseline: the 503 series must exist
    # before the first scrape and grow after it. So must gRPC's errors.
    scenarios.check_chaos(shop)
    scenarios.grpc_unavailable(shop)
    operators = release.sims[release.namespace].select(**OPERATOR)
    targets = observability.scrape_targets(shop.namespace, shop.pods.values(), operators)
    with prometheus(tmp_path, targets, [observability.RULES]) as prom:
        # rate() wants two samples of a series in its window: three scrapes each.
        prom.wait_for("3 scrapes of every target", lambda: scraped(prom, len(targets), 3), 30)
        scenarios.check_chaos(shop)
        scenarios.grpc_unavailable(shop)
        (errors,) = [q for w, q in observability.rule_queries() if w == "NatsmeshHighErrorRate"]
        payments = f"payments.{shop.namespace}"

        def error_ratio() -> float:
            ratios = {r["metric"]["destination"]: r["value"][1] for r in prom.query(errors)}
            return float(ratios.get(payments, 0))

        prom.wait_for("the chaos 503s in the error-rate alert", lambda: error_ratio() > 0, 15)
        prom.wait_for("every rule evaluated", lambda: rules_evaluated(prom), 15)
        queries = [
            *observability.dashboard_queries(shop.namespace),
            *observability.rule_queries(),
        ]
        queries += [
            (f"selector in {where}", f"count({sel})")
            for where, expr in list(queries)
            for sel in sorted(observability.selectors(expr))
        ]
        assert len(queries) > 40, queries
        empty = [(where, q) for where, q in queries if not prom.query(q)]
        assert not empty, "queries without data:\n" + "\n".join(f"{w}: {q}" for w, q in empty)
        bad = [
            (r["name"], r["health"], r.get("lastError"))
            for g in prom.api("rules")["groups"]
            for r in g["rules"]
            if r["health"] != "ok"
        ]
        assert not bad, bad


def scraped(prom: Prometheus, targets: int, scrapes: int) -> bool:
    """Every target up, and scraped at least ``scrapes`` times."""
    counts = prom.query("count_over_time(up[1m])")
    up = prom.query("up == 1")
    return len(up) == targets and all(float(c["value"][1]) >= scrapes for c in counts)


def rules_evaluated(prom: Prometheus) -> bool:
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    return bool(rules) and all(not r["lastEvaluation"].startswith("0001") for r in rules)


def test_natsmesh_check_and_status_on_the_installed_chart(
    release: LocalRelease, shop: LocalShop
) -> None:
    """The user commands against the real chart: the webhook Service's endpoints and
    the caBundle checked against the serving Secret (the Service is not reachable
    from here), NATS through its pod's port (what a port-forward would give)."""
    sim = release.sims[release.namespace]
    (nats,) = sim.select(**{"app.kubernetes.io/component": "nats"})
    url = f"nats://127.0.0.1:{nats.port(4222)}"
    cli = [sys.executable, "-m", "natsmesh_operator.cli"]
    env = release.cluster.env()
    check = subprocess.run(
        [*cli, "check", "-n", release.namespace, "--nats-url", url],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    lines = check.stdout.splitlines()
    for hook in ("inject", "validate"):
        assert any(
            line.startswith(f"PASS  webhook {hook}.natsmesh.io")
            and f"Service {release.namespace}/{RELEASE}-webhook: 2 ready endpoint(s)" in line
            and f"caBundle verifies the serving certificate in Secret {release.namespace}/" in line
            for line in lines
        ), check.stdout
    assert any(
        line.startswith("PASS  operator") and line.endswith(f"{RELEASE}-operator: 2/2 ready")
        for line in lines
    ), check.stdout
    assert any(
        line.startswith("PASS  nats") and "operator mode, JetStream on" in line for line in lines
    ), check.stdout
    assert any(
        line.startswith(f"PASS  namespace {shop.namespace}")
        and f"{len(WORKLOADS)}/{len(WORKLOADS)}" in line
        for line in lines
    ), check.stdout
    # The chart leaves the root key in a Secret for the admin to take offline.
    assert any(line.startswith("WARN  bootstrap root key") for line in lines), check.stdout

    status = subprocess.run(
        [*cli, "status", "-n", shop.namespace, "--system-namespace", release.namespace,
         "--nats-url", url, "-o", "json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    # Every sidecar answers $SRV.PING: one endpoint per service, as counted by the operator.
    assert {s["name"]: s["endpoints"] for s in data["services"]} == {w: "1" for w in WORKLOADS}
    assert data["lagNote"] == f"from {url}"
    assert all(e["pending"] in ("0", "-") for e in data["events"]), data["events"]


def test_chart_pods_run_as_their_specs_say(release: LocalRelease) -> None:
    """The operator talks to the API server as its service account; NATS runs the chart's config."""
    sim = release.sims[release.namespace]
    for pod in sim.select(**OPERATOR):
        env = pod.container("operator").env
        # The kubeconfig podsim made of the pod's bound token: the chart's service
        # account (and its RBAC), not the test's admin.
        who = subprocess.run(
            [tool("kubectl"), "--kubeconfig", env["KUBECONFIG"], "auth", "whoami", "-o", "json"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert json.loads(who.stdout)["status"]["userInfo"]["username"] == (
            f"system:serviceaccount:{release.namespace}:{pod.spec['serviceAccountName']}"
        )
        assert pod.spec["serviceAccountName"] == RELEASE
        assert env["NATSMESH_OPERATOR_NAMESPACE"] == release.namespace
        assert env["NATSMESH_WEBHOOK_CERT_DIR"].startswith(str(pod.dir))
        # webhook.clientAuth: the CA from the release's Secret, the API server's name.
        assert env["NATSMESH_WEBHOOK_CLIENT_NAMES"] == API_SERVER_CN
        client_ca = Path(env["NATSMESH_WEBHOOK_CLIENT_CA_FILE"])
        assert client_ca.read_bytes() == (release.cluster.webhook_client / "ca.crt").read_bytes()
    (nats,) = sim.select(**{"app.kubernetes.io/component": "nats"})
    conf = (nats.dir / "volumes" / "config" / "nats.conf").read_text()
    assert "include ../bootstrap/resolver.conf" in conf
    resolver = (nats.dir / "volumes" / "bootstrap" / "resolver.conf").read_text()
    assert "operator:" in resolver
    assert str(nats.dir) in resolver  # the resolver's directory, on the pod's volume


def test_the_webhook_answers_the_api_server_and_refuses_forged_reviews(
    cluster: Cluster, release: LocalRelease, shop: LocalShop, tmp_path: Path
) -> None:
    """The attack: a pod dials the webhook's Service and POSTs an AdmissionReview
    it made up, naming the shop's namespace, to learn which NatsService selects
    which labels. Without the API server's client certificate it gets nothing;
    the API server, presenting it, gets answers."""
    certs = cluster.webhook_client
    payments_pod = admission.pod({"app": "payments"})
    # Legitimate, through the API server: a pod gets payments' sidecar (a
    # server-side dry run calls the webhooks but creates nothing) ...
    dry_run = ("create", "-n", shop.namespace, "--dry-run=server", "-o", "json", "-f", "-")
    injected = json.loads(release.kubectl(*dry_run, input=json.dumps(payments_pod)))
    # The sidecar is a native sidecar: an init container that keeps running.
    assert [c["name"] for c in injected["spec"].get("initContainers", [])] == [SIDECAR]
    # ... and a NatsService claiming payments' pods is refused by the validating webhook.
    thief = json.loads(nats_service("thief"))
    thief["spec"]["selector"] = {"matchLabels": {"app": "payments"}}
    refused = release.cluster.kubectl(
        "apply", "-n", shop.namespace, "-f", "-", input=json.dumps(thief), check=False
    )
    assert refused.returncode != 0
    assert "overlaps NatsService 'payments'" in refused.stderr, refused.stderr

    # The attack, over the pod network (the Service, as kube-proxy routes it).
    webhook = release.network.address(release.namespace, f"{RELEASE}-webhook", 443)
    forged = admission.review("Pod", shop.namespace, payments_pod)
    (stranger,) = make_client_certs(tmp_path, [API_SERVER_CN], ca_name="evil")
    for client in (None, (stranger.certfile, stranger.keyfile)):
        # No certificate, or the API server's name from another CA: refused in
        # the TLS handshake, before a byte of the review is read.
        for path in ("/inject", "/validate"):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                admission.post(webhook, path, forged, client)
    # The cluster's CA, but not the API server's name: 403, and nothing else.
    status, body = admission.post(
        webhook, "/inject", forged, (certs / "other.crt", certs / "other.key")
    )
    assert (status, body) == (403, b"client certificate not allowed")
    # Beside it, the API server's own certificate gets the real answer to the
    # same review: the certificate is all that told them apart.
    status, body = admission.post(
        webhook, "/inject", forged, (certs / "apiserver.crt", certs / "apiserver.key")
    )
    assert status == 200
    assert "patch" in json.loads(body)["response"]


def reconciled(operator: SimPod) -> int:
    """NatsService reconciles this operator replica has run (from its log)."""
    log = operator.container("operator").tail(10**7)
    return log.count("Handler 'register.<locals>.service_reconcile")


def test_one_operator_replica_acts_the_other_stands_by(
    release: LocalRelease, shop: LocalShop
) -> None:
    """kopf peering with a priority per replica: exactly one handles resources."""
    operators = release.sims[release.namespace].select(**OPERATOR)
    assert len(operators) == 2
    handled = [reconciled(p) for p in operators]
    # The shop's NatsServices were all handled, and all by one replica.
    assert sorted(handled)[0] == 0, release.describe()
    assert sorted(handled)[1] >= len(WORKLOADS), release.describe()


def test_standby_takes_over_when_the_active_replica_goes(
    release: LocalRelease, shop: LocalShop
) -> None:
    """Delete the acting operator pod: the mesh keeps being reconciled."""
    sim = release.sims[release.namespace]
    (active,) = [p for p in sim.select(**OPERATOR) if reconciled(p) > 0]
    release.kubectl("delete", "pod", active.name, "-n", release.namespace, "--wait=false")
    sim.wait_for("the active operator pod to stop", lambda: active not in sim.select(), 30)
    # A late NatsService (selects no pods) must still become Ready.
    name = f"audit-{uuid.uuid4().hex[:4]}"
    release.kubectl("apply", "-n", shop.namespace, "-f", "-", input=nats_service(name))

    release.wait_resource_ready("natsservice", name, shop.namespace, timeout=45)
    release.kubectl("delete", "natsservice", name, "-n", shop.namespace, "--timeout=30s")


def test_helm_uninstall_leaves_nothing_behind(release: LocalRelease, shop: LocalShop) -> None:
    """Runs last in this module (pytest keeps file order): removes the shop, then the release."""
    release.kubectl(
        "delete", "natsservices,natsroutes", "--all", "-n", shop.namespace, "--timeout=60s",
        timeout=90,
    )  # fmt: skip
    out = release.uninstall()
    assert "uninstalled" in out, out
    assert release.leftovers() == []
    # The emulated pods are gone with their objects.
    sim = release.sims[release.namespace]
    sim.wait_for("the release's pods to stop", lambda: not sim.select(), timeout=60)
    # Kept on purpose: the CRDs (crds.keep) and the NATS trust root (chart docs).
    release.kubectl("get", "crd", *MESH_CRDS)
    assert "operator.jwt" in release.secret_data(f"{RELEASE}-nats-bootstrap")
