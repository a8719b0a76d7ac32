"""``natsmesh check``, ``status`` and ``analyze`` run as a user runs them.

Against the real local control plane and a real operator (with its
operator-mode NATS): the commands are subprocesses with only ``KUBECONFIG``
to go by, and the tests read their lines and exit status. Each failing check
runs beside the ones that still pass.

The test bed runs the operator as a local process, so a stand-in operator
Deployment (kwok runs its pods) carries what ``check`` and ``status`` read
from the chart's: its readiness, and its ``NATSMESH_*`` variables.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from natsmesh_operator.webhook.certgen import make_ca_and_cert
from natsmesh_operator.wiring.apply import connect_creds
from natsmesh_sidecar import subjects
from tests.fixtures.cluster import Cluster
from tests.fixtures.nats_server import free_port
from tests.fixtures.operator import OperatorProcess, operator_namespace, start_operator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SHOP = Path(__file__).resolve().parents[3] / "examples" / "shop"
SHOP_SERVICES = ("gateway", "orders", "orders-v2", "payments", "inventory")

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: natsmesh-operator
  namespace: {namespace}
  labels: {{app.kubernetes.io/part-of: natsmesh, app.kubernetes.io/component: operator}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app.kubernetes.io/component: operator}}}}
  template:
    metadata:
      labels: {{app.kubernetes.io/part-of: natsmesh, app.kubernetes.io/component: operator}}
    spec:
      containers:
        - name: operator
          image: natsmesh/operator:test
          env:
            - {{name: NATSMESH_NATS_URL, value: "{url}"}}
            - {{name: NATSMESH_BOOTSTRAP_SECRET, value: natsmesh-nats-bootstrap}}
            - {{name: NATSMESH_WATCH_NAMESPACES, value: "{scope}-*"}}
"""

NEVER_CALLED = """
apiVersion: admissionregistration.k8s.io/v1
kind: {kind}
metadata: {{name: {name}}}
webhooks:
  - name: {hook}
    admissionReviewVersions: [v1]
    sideEffects: None
    failurePolicy: Ignore
    clientConfig: {client}
    rules:
      - apiGroups: [never.example.com]
        apiVersions: [v1]
        operations: [CREATE]
        resources: [nothings]
"""


def natsmesh(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """``natsmesh ARGS`` as a user runs it: KUBECONFIG in the environment, nothing else."""
    return subprocess.run(
        [sys.executable, "-m", "natsmesh_operator.cli", *args],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def verdicts(stdout: str) -> dict[str, tuple[str, str]]:
    """``check``'s lines as ``{check name: (status, message)}``; fix lines are kept
    with the line before (as ``message + ' || fix: ...'``)."""
    out: dict[str, tuple[str, str]] = {}
    last = ""
    for line in stdout.splitlines():
        found = re.match(r"^(PASS|WARN|FAIL|SKIP)  (.{28})  (.*)$", line)
        if found:
            last = found.group(2).strip()
            out[last] = (found.group(1), found.group(3))
        elif line.strip().startswith("fix: ") and last:
            status, message = out[last]
            out[last] = (status, f"{message} || {line.strip()}")
    return out


def rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines()]


@pytest.fixture(scope="module")
def cli_operator(
    crds: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    with start_operator(crds, tmp_path_factory.mktemp("usercli")) as op:
        yield op


@pytest.fixture(scope="module")
def release(cli_operator: OperatorProcess) -> Iterator[OperatorProcess]:
    """The operator plus the stand-in Deployment, ready."""
    op = cli_operator
    manifest = DEPLOYMENT.format(namespace=op.namespace, url=op.nats.url, scope=op.scope)
    op.cluster.kubectl("apply", "-f", "-", input=manifest)
    op.cluster.kubectl(
        "rollout",
        "status",
        "deployment/natsmesh-operator",
        "-n",
        op.namespace,
        "--timeout=90s",
        timeout=120,
    )
    yield op
    op.cluster.kubectl("delete", "deployment", "natsmesh-operator", "-n", op.namespace, check=False)


@pytest.fixture(scope="module")
def shop(release: OperatorProcess) -> Iterator[str]:
    """The example shop, every NatsService Ready."""
    with operator_namespace(release) as ns:
        release.cluster.kubectl("apply", "-n", ns, "-f", str(SHOP), "-f", str(SHOP / "apps"))
        for name in SHOP_SERVICES:
            release.wait_ready("natsservice", name, ns, timeout=60)
        for name in ("orders", "payments"):
            release.wait_ready("natsroute", name, ns, timeout=60)
        yield ns


@pytest.fixture
def webhook_config(cluster: Cluster) -> Iterator[Callable[[str, str, str, dict[str, Any]], None]]:
    """Makes webhook configurations that no request ever reaches (kind, name, webhook
    name, clientConfig); deletes them afterwards."""
    made: list[tuple[str, str]] = []

    def make(kind: str, name: str, hook: str, client: dict[str, Any]) -> None:
        made.append((kind, name))
        manifest = NEVER_CALLED.format(kind=kind, name=name, hook=hook, client=json.dumps(client))
        cluster.kubectl("apply", "-f", "-", input=manifest)

    yield make
    for kind, name in made:
        cluster.kubectl("delete", kind.lower(), name, "--ignore-not-found", check=False)


# --------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------


def test_check_passes_on_a_working_install(release: OperatorProcess, shop: str) -> None:
    run = natsmesh(release.cluster, "check", "--namespace", release.namespace)
    assert run.returncode == 0, run.stdout + run.stderr
    found = verdicts(run.stdout)
    assert found["kubernetes api"][0] == "PASS"
    assert found["crd natsservices.natsmesh.io"] == (
        "PASS",
        "installed, same as this natsmesh generates",
    )
    assert found["crd natsroutes.natsmesh.io"][0] == "PASS"
    assert found["operator"] == ("PASS", "natsmesh-operator: 2/2 ready")
    for hook in ("inject", "validate"):
        status, message = found[f"webhook {hook}.natsmesh.io"]
        assert status == "PASS"
        assert message.endswith("caBundle verifies the serving certificate"), message
    assert found["bootstrap"][0] == "PASS"
    assert found["nats"][0] == "PASS"
    assert re.fullmatch(
        rf"{re.escape(release.nats.url)}: 1 server\(s\), nats-server [0-9.]+, operator mode, "
        "JetStream on",
        found["nats"][1],
    ), found["nats"]
    assert found[f"namespace {shop}"] == (
        "PASS",
        "account ready: 5/5 NatsServices have credentials",
    )
    assert run.stdout.rstrip().endswith("passed")
    assert "failed" not in run.stdout

    as_json = natsmesh(release.cluster, "check", "-n", release.namespace, "-o", "json")
    data = json.loads(as_json.stdout)
    assert as_json.returncode == 0
    assert data["ok"] is True
    assert {c["name"] for c in data["checks"]} >= {"operator", "nats", f"namespace {shop}"}


def test_check_fails_when_nats_is_unreachable(release: OperatorProcess, shop: str) -> None:
    nowhere = f"nats://127.0.0.1:{free_port()}"
    run = natsmesh(release.cluster, "check", "-n", release.namespace, "--nats-url", nowhere)
    assert run.returncode == 1
    found = verdicts(run.stdout)
    status, message = found["nats"]
    assert status == "FAIL"
    assert message.startswith(f"cannot connect to {nowhere} as the system user")
    assert "|| fix: " in message
    assert "--nats-url" in message
    # Beside it, what still works still passes.
    assert found["bootstrap"][0] == "PASS"
    assert found["operator"] == ("PASS", "natsmesh-operator: 2/2 ready")
    assert found[f"namespace {shop}"][0] == "PASS"
    assert run.stdout.rstrip().endswith("1 failed")


def test_check_fails_where_nothing_is_installed(release: OperatorProcess, namespace: str) -> None:
    run = natsmesh(release.cluster, "check", "-n", namespace)
    assert run.returncode == 1
    found = verdicts(run.stdout)
    assert found["kubernetes api"][0] == "PASS"
    assert found["crd natsservices.natsmesh.io"][0] == "PASS"
    assert found["operator"][0] == "FAIL"
    assert found["operator"][1].startswith(
        "no Deployment labelled app.kubernetes.io/part-of=natsmesh,"
        f"app.kubernetes.io/component=operator in {namespace}"
    )
    assert found["webhook inject.natsmesh.io"][0] == "FAIL"
    assert found["bootstrap"][0] == "FAIL"
    assert found["bootstrap"][1].startswith(f"Secret {namespace}/natsmesh-nats-bootstrap not found")
    assert found["nats"][0] == "SKIP"


def test_check_fails_when_the_ca_bundle_does_not_verify(
    release: OperatorProcess,
    namespace: str,
    webhook_config: Callable[[str, str, str, dict[str, Any]], None],
    tmp_path: Path,
) -> None:
    """The release in ``namespace`` registered itself at the operator's URL, but with
    a caBundle of another CA: the API server could not call it."""
    url = release.get("validatingwebhookconfiguration", f"natsmesh-{release.namespace}", "")[
        "webhooks"
    ][0]["clientConfig"]["url"]
    make_ca_and_cert(tmp_path / "other", ["127.0.0.1"])
    other_ca = base64.b64encode((tmp_path / "other" / "ca.crt").read_bytes()).decode()
    name = f"natsmesh-{namespace}"
    webhook_config(
        "ValidatingWebhookConfiguration",
        name,
        "validate.natsmesh.io",
        {"url": url, "caBundle": other_ca},
    )
    run = natsmesh(release.cluster, "check", "-n", namespace)
    assert run.returncode == 1
    status, message = verdicts(run.stdout)["webhook validate.natsmesh.io"]
    assert status == "FAIL"
    assert message.startswith(f"caBundle of {name} does not verify the serving certificate: ")
    # The release's own configuration, same server, its own CA: verified.
    ok = verdicts(natsmesh(release.cluster, "check", "-n", release.namespace).stdout)
    assert ok["webhook validate.natsmesh.io"][1].endswith(
        "caBundle verifies the serving certificate"
    )


def test_pre_install_check_and_a_webhook_left_behind(
    release: OperatorProcess, webhook_config: Callable[[str, str, str, dict[str, Any]], None]
) -> None:
    name = f"natsmesh-gone-{uuid.uuid4().hex[:6]}"
    webhook_config(
        "MutatingWebhookConfiguration",
        name,
        "inject.natsmesh.io",
        {"service": {"name": "natsmesh-webhook", "namespace": f"{name}-ns"}},
    )
    run = natsmesh(release.cluster, "check", "--pre")
    assert run.returncode == 1
    found = verdicts(run.stdout)
    assert found["kubernetes api"][0] == "PASS"
    assert found["permissions"] == (
        "PASS",
        "may create CRDs, webhook configurations, cluster RBAC, Secrets",
    )
    assert found["crd natsroutes.natsmesh.io"] == (
        "PASS",
        "installed, same as this natsmesh generates",
    )
    status, message = found["old webhooks"]
    assert status == "FAIL"
    assert f"MutatingWebhookConfiguration {name}" in message
    assert f"fix: kubectl delete mutatingwebhookconfiguration {name}" in message

    release.cluster.kubectl("delete", "mutatingwebhookconfiguration", name)
    again = natsmesh(release.cluster, "check", "--pre")
    assert name not in again.stdout
    # Exit status follows the lines (other sessions' leftovers may share the cluster).
    assert again.returncode == (1 if "FAIL  " in again.stdout else 0)


# --------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------


async def publish_orders(op: OperatorProcess, namespace: str, count: int) -> None:
    """Publish ``count`` order.created events as orders (with its own creds)."""
    creds = op.creds(namespace, "orders")
    assert creds is not None
    nc = await connect_creds(op.nats.url, creds, inbox_prefix=subjects.inbox_prefix("orders"))
    try:
        for i in range(count):
            await nc.publish(
                subjects.event_subject(namespace, "orders", "order.created"), f"{i}".encode()
            )
        await nc.flush()
    finally:
        await nc.close()


def pending_of(op: OperatorProcess, namespace: str) -> dict[str, str]:
    run = natsmesh(
        op.cluster, "status", "-n", namespace, "--system-namespace", op.namespace, "-o", "json"
    )
    assert run.returncode == 0, run.stderr
    events = json.loads(run.stdout)["events"]
    return {e["subscriber"]: e["pending"] for e in events if e["topic"] == "order.created"}


async def test_status_shows_the_shop_and_its_backlog(release: OperatorProcess, shop: str) -> None:
    await publish_orders(release, shop, 3)
    release.wait_for(
        "a backlog of 3 order.created",
        lambda: pending_of(release, shop) == {f"{shop}/payments": "3", f"{shop}/inventory": "3"},
        timeout=20,
        interval=0.5,
    )
    run = natsmesh(release.cluster, "status", "-n", shop, "--system-namespace", release.namespace)
    assert run.returncode == 0, run.stderr
    table = rows(run.stdout)
    assert ["orders-v2", "orders", "v2", "True", "0", f"mesh.{shop}.orders.v2"] in table
    assert ["payments", f"{shop}/orders"] in table
    assert [
        "orders",
        f"{shop}/gateway,",
        "analytics/reports",
        "(admits",
        "nobody:",
        "no",
        "such",
        "NatsService)",
    ] in table
    assert ["orders", "orders", "canary", "*", "v1=90%", "v2=10%", "2s", "3x"] in table
    assert ["orders", "order.created", f"{shop}/payments", "atLeastOnce", "3", "0", "0"] in table
    assert ["orders", "order.cancelled", f"{shop}/inventory", "atMostOnce", "0", "0", "0"] in table
    assert ["inventory", "stock.low", "-", "-", "-", "-", "-"] in table
    assert f"lag: from {release.nats.url}" in run.stdout

    skipped = natsmesh(release.cluster, "status", "-n", shop, "--no-nats")
    assert skipped.returncode == 0
    assert "lag: not shown (--no-nats)" in skipped.stdout
    assert ["orders", "order.created", f"{shop}/payments", "atLeastOnce", "-", "-", "-"] in rows(
        skipped.stdout
    )


def test_status_of_all_namespaces(release: OperatorProcess, shop: str) -> None:
    run = natsmesh(release.cluster, "status", "-A", "--no-nats")
    assert run.returncode == 0, run.stderr
    table = rows(run.stdout)
    assert ["NAMESPACE", "NAME", "SERVICE", "VERSION", "READY", "ENDPOINTS", "SUBJECT"] in table
    assert [shop, "gateway", "gateway", "v1", "True", "0", f"mesh.{shop}.gateway.v1"] in table


def test_status_says_why_lag_is_missing(release: OperatorProcess, shop: str) -> None:
    nowhere = f"nats://127.0.0.1:{free_port()}"
    run = natsmesh(
        release.cluster,
        "status",
        "-n",
        shop,
        "--system-namespace",
        release.namespace,
        "--nats-url",
        nowhere,
    )
    assert run.returncode == 0
    assert f"lag: not shown: NATS at {nowhere} not reachable" in run.stdout
    assert ["orders", "order.created", f"{shop}/payments", "atLeastOnce", "-", "-", "-"] in rows(
        run.stdout
    )


# --------------------------------------------------------------------------
# analyze
# --------------------------------------------------------------------------

MISTAKES = """
apiVersion: natsmesh.io/v1alpha1
kind: NatsService
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  port: 8080
  allowedCallers: [{name: ghost}]
---
apiVersion: natsmesh.io/v1alpha1
kind: NatsService
metadata: {name: front}
spec:
  selector: {matchLabels: {tier: front}}
  port: 8080
---
apiVersion: natsmesh.io/v1alpha1
kind: NatsService
metadata: {name: lonely}
spec:
  selector:
    matchLabels: {app: lonely}
    matchExpressions: [{key: tier, operator: DoesNotExist}]
  port: 8080
---
apiVersion: natsmesh.io/v1alpha1
kind: NatsService
metadata: {name: mailer}
spec:
  selector:
    matchLabels: {app: mailer}
    matchExpressions: [{key: tier, operator: DoesNotExist}]
  port: 8080
  events:
    subscriptions: [{service: web, topic: order.shipped, path: /shipped}]
---
apiVersion: natsmesh.io/v1alpha1
kind: NatsRoute
metadata: {name: web}
spec:
  service: web
  rules: [{destinations: [{version: v1, weight: 80}, {version: v3, weight: 20}]}]
"""


def pod(name: str, **labels: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
        }
    )


def test_analyze_reports_each_mistake_and_exits_1(
    cluster: Cluster, crds: Cluster, namespace: str
) -> None:
    """No operator manages this namespace, so nothing refused these at admission
    (as when the webhook was down): only the analysis says what is wrong."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=MISTAKES)
    cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input="\n---\n".join([pod("both", app="web", tier="front"), pod("mail", app="mailer")]),
    )
    run = natsmesh(cluster, "analyze", "-n", namespace)
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    heads = [line.split(")", 1)[0] + ")" for line in lines[:-1]]
    assert heads == [
        f"Error [NM001] (NatsRoute {namespace}/web)",
        f"Error [NM005] (NatsService {namespace}/mailer)",
        f"Error [NM007] (NatsService {namespace}/web)",
        f"Warning [NM006] (NatsService {namespace}/web)",
        f"Warning [NM008] (NatsService {namespace}/lonely)",
    ]
    assert lines[2].endswith(
        "selector overlaps NatsService front's: pods both match both; a pod selected by two "
        "NatsServices gets no sidecar (the webhook refuses it): make the selectors exclusive"
    )
    assert "selector app=lonely,tier DoesNotExist matches no pod" in lines[4]
    assert "version v3 of web has no NatsService (versions: v1)" in lines[0]
    assert lines[-1] == f"3 errors, 2 warnings in namespace {namespace}."

    as_json = json.loads(natsmesh(cluster, "analyze", "-n", namespace, "-o", "json").stdout)
    assert [f["code"] for f in as_json["findings"]] == ["NM001", "NM005", "NM007", "NM006", "NM008"]

    # Fixed: the overlap, the lonely selector, the route and the subscription.
    cluster.kubectl("delete", "-n", namespace, "natsservice", "front", "lonely", "mailer")
    cluster.kubectl("delete", "-n", namespace, "natsroute", "web")
    after = natsmesh(cluster, "analyze", "-n", namespace)
    assert after.returncode == 0, after.stdout
    assert after.stdout.splitlines() == [
        f"Warning [NM006] (NatsService {namespace}/web) allowedCallers names {namespace}/ghost: "
        "no such NatsService, so the entry admits nobody",
        f"1 warning in namespace {namespace}.",
    ]
    cluster.kubectl(
        "patch",
        "-n",
        namespace,
        "natsservice",
        "web",
        "--type=json",
        "-p",
        '[{"op": "remove", "path": "/spec/allowedCallers"}]',
    )
    clean = natsmesh(cluster, "analyze", "-n", namespace)
    assert clean.returncode == 0
    assert clean.stdout == f"No problems found in namespace {namespace}.\n"


def test_analyze_of_the_running_shop_has_only_warnings(release: OperatorProcess, shop: str) -> None:
    run = natsmesh(release.cluster, "analyze", "-n", shop)
    assert run.returncode == 0, run.stdout
    assert (
        f"Warning [NM006] (NatsService {shop}/orders) allowedCallers names analytics/reports: "
        "no such NatsService, so the entry admits nobody"
    ) in run.stdout
    # No sidecar runs in the test bed: every routed version has 0 endpoints.
    assert (
        f"Warning [NM002] (NatsRoute {shop}/orders) rule canary: version v1 of orders" in run.stdout
    )
    assert "Error" not in run.stdout


def test_analyze_all_namespaces_includes_the_shop(release: OperatorProcess, shop: str) -> None:
    started = time.monotonic()
    run = natsmesh(release.cluster, "analyze", "-A")
    assert f"(NatsService {shop}/orders) allowedCallers names analytics/reports" in run.stdout
    assert run.stdout.rstrip().endswith("in all namespaces.")
    assert time.monotonic() - started < 30
