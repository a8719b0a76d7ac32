"""``helm install`` in namespaced mode (operator.watchNamespaces) on the local control plane.

The chart's pods run emulated with their ServiceAccount tokens (podsim), so
the operator replicas act with exactly the Roles the chart renders: they must
peer through the KopfPeering in the listed namespace, make a NatsService there
Ready with creds and its NetworkPolicy, and leave one in an unlisted namespace
alone, while that ServiceAccount cannot read Secrets outside the list.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from tests.e2e.local import (
    LOCAL_ONLY,
    RELEASE,
    LocalRelease,
    local_release,
)
from tests.fixtures.cluster import Cluster, nats_service

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240), LOCAL_ONLY]


@pytest.fixture(scope="module")
def namespaces(cluster: Cluster) -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:6]
    listed, unlisted = f"nsmode-a-{suffix}", f"nsmode-b-{suffix}"
    for ns in (listed, unlisted):
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl("label", "namespace", ns, "natsmesh.io/inject=enabled")
    try:
        yield listed, unlisted
    finally:
        for ns in (listed, unlisted):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def release(
    cluster: Cluster, namespaces: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalRelease]:
    listed, _ = namespaces
    with local_release(cluster, "natsmesh-nsmode", tmp_path_factory.mktemp("pods")) as release:
        release.install_running(f"operator.watchNamespaces={{{listed}}}")
        yield release


def test_namespaced_install_reconciles_only_the_listed_namespace(
    release: LocalRelease, namespaces: tuple[str, str]
) -> None:
    listed, unlisted = namespaces
    release.kubectl("get", "kopfpeering", "natsmesh", "-n", listed)
    for ns in (listed, unlisted):
        release.kubectl("apply", "-n", ns, "-f", "-", input=nats_service("orders"))
    release.wait_resource_ready("natsservice", "orders", listed, timeout=90)
    creds = json.loads(
        release.kubectl("get", "secret", "natsmesh-orders-creds", "-n", listed, "-o", "json")
    )
    assert "user.creds" in creds["data"]
    release.kubectl("get", "networkpolicy", "natsmesh-orders-app", "-n", listed)
    other = json.loads(
        release.kubectl("get", "natsservice", "orders", "-n", unlisted, "-o", "json")
    )
    assert not other.get("status"), other
    assert not other["metadata"].get("finalizers"), other
    account = f"system:serviceaccount:{release.namespace}:{RELEASE}"

    def can(*args: str) -> bool:
        out = release.kubectl("auth", "can-i", *args, f"--as={account}", check=False)
        return out.strip() == "yes"

    assert can("list", "secrets", "-n", listed)
    assert not can("list", "secrets", "-n", unlisted)
    assert not can("get", "secrets", "-n", "kube-system")
    assert not can("get", f"secret/{RELEASE}-nats-bootstrap-root", "-n", release.namespace)
