"""``helm install`` / ``helm uninstall`` of charts/natsmesh with default values, locally.

The defaults ask for what a production cluster has: three NATS servers with
PVCs and two operator replicas. kwok has no volume provisioner, so the NATS
pods stay Pending on their claims, as they would on a cluster without a
default StorageClass; everything else must install, run its hook and
uninstall cleanly. (test_e2e_shop.py runs the mesh itself, with one NATS
server and no PVC.)
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e.local import CHART, LOCAL_ONLY, MESH_CRDS, RELEASE, LocalRelease, local_release
from tests.fixtures.cluster import Cluster, tool

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180), LOCAL_ONLY]


@pytest.fixture(scope="module")
def defaults(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRelease]:
    with local_release(cluster, "natsmesh-defaults", tmp_path_factory.mktemp("pods")) as release:
        yield release


def test_helm_lint_passes(cluster: Cluster) -> None:
    proc = subprocess.run(
        [tool("helm"), "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_schema_refuses_an_unknown_key(defaults: LocalRelease) -> None:
    proc = subprocess.run(
        [
            tool("helm"), "--kubeconfig", str(defaults.cluster.kubeconfig), "install",
            "typo", str(CHART), "--namespace", defaults.namespace, "--dry-run=server",
            "--set", "operator.replica=3",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert "replica" in proc.stderr
    assert defaults.helm("list", "-A", "-q").split().count("typo") == 0


def test_install_with_default_values(defaults: LocalRelease) -> None:
    out = defaults.install()
    assert "STATUS: deployed" in out, out
    ns = defaults.namespace
    # The pre-install hook ran (emulated): the trust root exists, the hook's Job is gone.
    bootstrap = defaults.secret_data(f"{RELEASE}-nats-bootstrap")
    assert {"operator.jwt", "resolver.conf", "signing.nk"} <= set(bootstrap)
    # The operator root key went to a Secret of its own, for the admin to take offline.
    assert "operator.nk" not in bootstrap
    assert set(defaults.secret_data(f"{RELEASE}-nats-bootstrap-root")) == {"operator.nk"}
    assert defaults.kubectl("get", "jobs", "-n", ns, "-o", "name").strip() == ""
    deploy = json.loads(
        defaults.kubectl("get", "deployment", RELEASE + "-operator", "-n", ns, "-o", "json")
    )
    assert deploy["spec"]["replicas"] == 2
    sts = json.loads(
        defaults.kubectl("get", "statefulset", RELEASE + "-nats", "-n", ns, "-o", "json")
    )
    assert sts["spec"]["replicas"] == 3
    claims = defaults.kubectl("get", "pvc", "-n", ns, "-o", "name").split()
    assert len(claims) == 3, claims
    hooks = json.loads(
        defaults.kubectl("get", "mutatingwebhookconfiguration", RELEASE, "-o", "json")
    )["webhooks"]
    assert hooks[0]["clientConfig"]["service"]["namespace"] == ns
    assert hooks[0]["clientConfig"]["caBundle"]
    defaults.kubectl("get", "clusterkopfpeering", "natsmesh")
    # Both operator replicas run (emulated) and answer their probes.
    defaults.wait_ready("operator", 2)
    # The API server reaches the webhook and gets its answer: a NatsRoute to a
    # service nobody serves is admitted with the webhook's warning (a dry run
    # creates nothing). The local API server offers a client certificate the
    # default install never asks for (hack/cluster.sh): it changes nothing.
    route = {
        "apiVersion": "natsmesh.io/v1alpha1",
        "kind": "NatsRoute",
        "metadata": {"name": "ghost"},
        "spec": {"service": "ghost", "rules": [{"destinations": [{"version": "v1"}]}]},
    }
    admitted = defaults.cluster.kubectl(
        "apply", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(route)
    )
    assert "no NatsService serves 'ghost'" in admitted.stderr, admitted.stderr


def test_upgrade_keeps_the_webhook_ca_and_the_trust_root(defaults: LocalRelease) -> None:
    """The chart-made CAs, the route credentials (lookup) and the bootstrap Secret
    survive ``helm upgrade``."""
    tls = defaults.secret_data(f"{RELEASE}-webhook-tls")
    trust = defaults.secret_data(f"{RELEASE}-nats-bootstrap")
    routes = defaults.secret_data(f"{RELEASE}-nats-routes")
    routes_tls = defaults.secret_data(f"{RELEASE}-nats-routes-tls")
    ca_bundle = json.loads(
        defaults.kubectl("get", "mutatingwebhookconfiguration", RELEASE, "-o", "json")
    )["webhooks"][0]["clientConfig"]["caBundle"]
    out = defaults.helm(
        "upgrade", RELEASE, str(CHART), "--namespace", defaults.namespace,
        "--reuse-values", "--set", "webhook.timeoutSeconds=7", "--timeout", "3m",
        timeout=240,
    )  # fmt: skip
    assert "REVISION: 2" in out, out
    assert defaults.secret_data(f"{RELEASE}-webhook-tls") == tls
    # The route password and the route CA (lookup): running servers keep theirs.
    assert defaults.secret_data(f"{RELEASE}-nats-routes") == routes
    assert defaults.secret_data(f"{RELEASE}-nats-routes-tls") == routes_tls
    # The pre-upgrade hook ran again (emulated) and left the trust root alone.
    assert defaults.secret_data(f"{RELEASE}-nats-bootstrap") == trust
    hook = json.loads(
        defaults.kubectl("get", "mutatingwebhookconfiguration", RELEASE, "-o", "json")
    )["webhooks"][0]
    assert hook["clientConfig"]["caBundle"] == ca_bundle
    assert hook["timeoutSeconds"] == 7


def test_uninstall_leaves_nothing_behind(defaults: LocalRelease) -> None:
    ns = defaults.namespace
    sim = defaults.sims[ns]
    killed_before = list(sim.killed)
    # The operator's service account first, as the uninstall may delete it
    # while the pod still runs: every call of the operator then gets a 401
    # (not the 403 of its RBAC gone). It used to log in again ~100 times a
    # second with the same refused token, until the kill at the grace.
    account = defaults.kubectl(
        "get", "deployment", "-n", ns, "-l", "app.kubernetes.io/component=operator",
        "-o", "jsonpath={.items[0].spec.template.spec.serviceAccountName}",
    )  # fmt: skip
    with sim.lock:
        operators = [
            c
            for pod in sim.pods.values()
            if pod.labels.get("app.kubernetes.io/component") == "operator"
            for c in pod.containers
        ]
    assert operators

    # A resource the operator has handled: deleted once the token is dead,
    # the active replica calls the API server for it (its open watch still
    # delivers the event) and gets the 401.
    def probe(name: str) -> str:
        return f"""
apiVersion: natsmesh.io/v1alpha1
kind: NatsService
metadata: {{name: {name}, namespace: {ns}}}
spec: {{selector: {{matchLabels: {{app: {name}}}}}, port: 8080}}
"""

    probe_ref = ("natsservice", "relogin-probe", "-n", ns)
    defaults.kubectl("apply", "-f", "-", input=probe("relogin-probe"))
    defaults.wait_for(
        "the operator to handle the probe",
        lambda: "natsmesh.io" in defaults.kubectl("get", *probe_ref, "-o", "jsonpath={.metadata}"),
        timeout=30,
    )
    defaults.kubectl("delete", "serviceaccount", account, "-n", ns)

    def refused() -> bool:
        texts = (c.log_path.read_text(errors="replace") for c in operators)
        return any("the operator's credentials failed" in t for t in texts)

    def token_refused() -> bool:
        # The webhook validates with the operator's token too: once the API
        # server refuses that token (it caches a good one for a few seconds),
        # a server-side dry run fails with "could not validate".
        check = probe("relogin-check")
        dry = defaults.cluster.kubectl(
            "apply", "--dry-run=server", "-f", "-", input=check, check=False
        )
        return "could not validate" in dry.stderr

    # A kopf call may meet the 401 first and stop the operator, webhook and all.
    defaults.wait_for(
        "the API server to refuse the operator's token",
        lambda: refused() or token_refused(),
        timeout=30,
    )
    defaults.kubectl("delete", *probe_ref, "--wait=false")

    defaults.wait_for("the operator to stop on its refused token", refused, timeout=30)
    out = defaults.uninstall()
    assert "uninstalled" in out, out
    # Every pod stops on SIGTERM, the operator too although its RBAC went
    # first (it used to wait out 54 s of 403s, until the kill at the grace).

    def servers_running() -> list[str]:
        components = ("operator", "nats")
        with sim.lock:
            pods = list(sim.pods.values())
        return [p.name for p in pods if p.labels.get("app.kubernetes.io/component") in components]

    sim.wait_for("the operator and NATS pods to stop", lambda: not servers_running(), timeout=30)
    assert sim.killed == killed_before, sim.killed
    # The first re-login that reads the refused token again stops the
    # operator (main.ApiLogin); before, every object's handler retry (once a
    # second) was one more 401 and one more re-login until the SIGTERM, and
    # before that ~100 a second. A few per run of the process: every request
    # already in flight on the refused session may still ask once (1 was
    # seen). (Exited, the kubelet restarts it.)
    for c in operators:
        text = c.log_path.read_text(errors="replace")
        logins = text.count("Re-authentication has been initiated")
        assert logins <= 5 * (1 + c.restarts), f"{c.log_path}: {logins} re-authentications"
    # No operator is left to remove the probe's finalizer.
    defaults.kubectl("patch", *probe_ref, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    defaults.kubectl("wait", "--for=delete", *probe_ref, "--timeout=20s")
    # Kept on purpose, as the chart documents: the NATS data
    # (persistence.retentionPolicy.whenDeleted: Retain), the CRDs (crds.keep)
    # and the NATS trust root.
    claims = [f"persistentvolumeclaim/data-{RELEASE}-nats-{i}" for i in range(3)]
    assert sorted(defaults.leftovers()) == claims
    defaults.kubectl("delete", *claims, "-n", ns, "--wait=false")
    defaults.kubectl("get", "crd", *MESH_CRDS)
    assert defaults.secret_data(f"{RELEASE}-nats-bootstrap")
    left = defaults.kubectl(
        "get", "all,configmaps,secrets,serviceaccounts,roles,rolebindings", "-n", ns, "-o", "name"
    ).split()
    assert sorted(left) == sorted(
        [
            f"secret/{RELEASE}-nats-bootstrap",
            f"secret/{RELEASE}-nats-bootstrap-root",
            "configmap/kube-root-ca.crt",
            "serviceaccount/default",
        ]
    ), left
