"""A namespaced install: the operator's ServiceAccount reaches only what it manages.

The chart rendered with ``operator.watchNamespaces`` (helm template) is applied
to the real API server: its ServiceAccount, ClusterRole and Roles. Then, as
that ServiceAccount (``kubectl auth can-i --as`` and real calls with its own
token): Secrets in kube-system, in an unlisted namespace and the root Secret
in the release namespace are out of reach, as are workloads there, while the
listed namespace and the bootstrap Secret are in reach. The operator process
itself runs with that token and only the listed namespace, and still makes a
NatsService Ready with working creds; one in an unlisted namespace is left
alone.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from natsmesh_operator.wiring import bootstrap
from tests.fixtures.cluster import REPO, Cluster, nats_service, token_kubeconfig, tool
from tests.fixtures.operator import OperatorProcess, start_operator

pytestmark = pytest.mark.timeout(240)

CHART = REPO / "charts" / "natsmesh"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


@dataclass
class Install:
    op: OperatorProcess
    release: str
    listed: str
    unlisted: str
    account: str

    @property
    def cluster(self) -> Cluster:
        return self.op.cluster

    def can(self, verb: str, resource: str, namespace: str | None = None) -> bool:
        args = ["auth", "can-i", verb, resource, f"--as={self.account}"]
        args += ["-n", namespace] if namespace else ["--all-namespaces"]
        out = self.cluster.kubectl(*args, check=False)
        return out.stdout.strip() == "yes"


def rendered_rbac(release: str, namespace: str, listed: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [
            tool("helm"), "template", release, str(CHART), "--namespace", namespace,
            "--set", f"operator.watchNamespaces={{{listed}}}",
        ],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out) if d]
    return [
        d
        for d in docs
        if d["kind"] in RBAC_KINDS
        # The bootstrap hook's own objects are not the operator's.
        and "helm.sh/hook" not in (d["metadata"].get("annotations") or {})
    ]


@pytest.fixture(scope="module")
def install(crds: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    workdir = tmp_path_factory.mktemp("rbac")
    op = start_operator(crds, workdir)
    scope = op.scope
    listed, unlisted = f"{scope}-listed", f"{scope}-unlisted"
    release = f"natsmesh-{uuid.uuid4().hex[:6]}"
    rbac = rendered_rbac(release, op.namespace, listed)
    try:
        for ns in (listed, unlisted):
            crds.kubectl("create", "namespace", ns)
            crds.kubectl("label", "namespace", ns, "natsmesh.io/inject=enabled")
        crds.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in rbac))
        secret = f"{release}-nats-bootstrap"
        crds.kubectl(
            "apply",
            "-f",
            "-",
            input=bootstrap.secret_manifest(op.nats.boot.files(), secret, op.namespace),
        )
        # The root Secret the chart's hook would write next to it.
        assert op.nats.boot.root is not None
        crds.kubectl(
            "apply", "-f", "-",
            input=bootstrap.secret_manifest(
                {"operator.nk": op.nats.boot.root.seed}, f"{secret}-root", op.namespace
            ),
        )  # fmt: skip
        # The operator, restarted as the chart's ServiceAccount on the listed namespace only.
        account = release  # the ServiceAccount is named after the fullname
        op.env.update(
            {
                "KUBECONFIG": str(token_kubeconfig(crds, account, op.namespace, workdir / "sa")),
                "NATSMESH_WATCH_NAMESPACES": listed,
                "NATSMESH_BOOTSTRAP_SECRET": secret,
            }
        )
        # Registering webhooks needs admissionregistration rights the chart never grants.
        op.env.pop("NATSMESH_WEBHOOK_SELF_REGISTER_URL", None)
        op.restart()
        yield Install(
            op, release, listed, unlisted, f"system:serviceaccount:{op.namespace}:{account}"
        )
    finally:
        op.teardown()
        for ns in (listed, unlisted):
            crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        for d in rbac:
            if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}:
                crds.kubectl("delete", d["kind"].lower(), d["metadata"]["name"], check=False)


def test_secrets_out_of_scope_are_refused(install: Install) -> None:
    i = install
    # Legitimate: the listed namespace's creds Secrets, the bootstrap Secret by name.
    assert i.can("list", "secrets", i.listed)
    assert i.can("create", "secrets", i.listed)
    assert i.can("get", f"secret/{i.release}-nats-bootstrap", i.op.namespace)
    assert i.can("patch", "secret/natsmesh-keys", i.op.namespace)
    # Attack surface a compromised operator had before: every Secret anywhere.
    for ns in ("kube-system", i.unlisted):
        for verb in ("get", "list", "watch", "patch", "delete"):
            assert not i.can(verb, "secrets", ns), (verb, ns)
    assert not i.can("list", "secrets")  # across the cluster
    # In its own namespace, only the two Secrets it names: not the root.
    assert not i.can("get", f"secret/{i.release}-nats-bootstrap-root", i.op.namespace)
    assert not i.can("list", "secrets", i.op.namespace)


def test_workloads_out_of_scope_are_refused(install: Install) -> None:
    i = install
    assert i.can("patch", "deployments.apps", i.listed)
    assert i.can("patch", "statefulsets.apps", i.listed)
    for ns in ("kube-system", i.unlisted):
        assert not i.can("patch", "deployments.apps", ns)
        assert not i.can("patch", "statefulsets.apps", ns)
        assert not i.can("list", "pods", ns)
        assert not i.can("create", "networkpolicies.networking.k8s.io", ns)
    assert not i.can("patch", "deployments.apps")
    assert not i.can("create", "clusterrolebindings.rbac.authorization.k8s.io")
    # Cluster-scoped reads it keeps: namespaces and CRDs (names and labels only).
    assert i.can("get", "namespaces")
    assert i.can("list", "customresourcedefinitions.apiextensions.k8s.io")


def test_real_calls_with_the_operator_token(install: Install) -> None:
    """Not just the authorizer's answer: the API server refuses the token's calls."""
    i = install
    as_sa = ["--kubeconfig", i.op.env["KUBECONFIG"]]
    refused = subprocess.run(
        [tool("kubectl"), *as_sa, "get", "secrets", "-n", "kube-system"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "forbidden" in refused.stderr.lower()
    root = subprocess.run(
        [tool("kubectl"), *as_sa, "get", "secret", f"{i.release}-nats-bootstrap-root",
         "-n", i.op.namespace],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "forbidden" in root.stderr.lower()
    allowed = subprocess.run(
        [tool("kubectl"), *as_sa, "get", "secrets", "-n", i.listed, "-o", "name"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr


def test_the_operator_still_reconciles_the_listed_namespace(install: Install) -> None:
    i, op = install, install.op
    op.cluster.kubectl("apply", "-n", i.listed, "-f", "-", input=nats_service("orders"))
    op.cluster.kubectl("apply", "-n", i.unlisted, "-f", "-", input=nats_service("orders"))
    op.wait_ready("natsservice", "orders", i.listed, timeout=60)
    creds = base64.b64decode(
        op.get("secret", "natsmesh-orders-creds", i.listed)["data"]["user.creds"]
    ).decode()

    async def connect() -> None:
        nc = await op.nats.connect(creds, max_reconnect_attempts=0, connect_timeout=2)
        try:
            await nc.flush(timeout=2)
        finally:
            await nc.close()

    asyncio.run(connect())
    # The per-service NetworkPolicy too (a namespaced write it needs).
    op.get("networkpolicy", "natsmesh-orders-app", i.listed)
    # The unlisted namespace is not its business: no creds, no status.
    missing = op.cluster.kubectl(
        "get", "secret", "natsmesh-orders-creds", "-n", i.unlisted, check=False
    )
    assert missing.returncode != 0
    assert not op.get("natsservice", "orders", i.unlisted).get("status")
    assert "Forbidden" not in op.tail(20000), op.tail()
