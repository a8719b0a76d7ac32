"""The local control plane is a real Kubernetes: API objects round-trip, v1.36, two Ready nodes."""

from __future__ import annotations

import json
import uuid

import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap, Namespace

from tests.fixtures.cluster import Cluster

pytestmark = pytest.mark.integration


def test_server_version_is_1_36(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.36.")
    assert version["clientVersion"]["gitVersion"].startswith("v1.36.")


def test_two_ready_fake_nodes(cluster: Cluster) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    ready = [
        n["metadata"]["name"]
        for n in nodes
        if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])
    ]
    assert len(ready) >= 2, f"Ready nodes: {ready}"


async def test_namespace_and_configmap_round_trip(cluster: Cluster) -> None:
    client = AsyncClient(config=KubeConfig.from_file(str(cluster.kubeconfig)))
    name = f"found-{uuid.uuid4().hex[:8]}"
    try:
        await client.create(Namespace(metadata=ObjectMeta(name=name)))
        await client.create(
            ConfigMap(metadata=ObjectMeta(name="probe", namespace=name), data={"k": "v"})
        )
        got = await client.get(ConfigMap, "probe", namespace=name)
        assert got.data == {"k": "v"}
        assert (await client.get(Namespace, name)).status.phase == "Active"  # type: ignore[union-attr]
    finally:
        await client.delete(Namespace, name)
        await client.close()


def test_scheduled_pod_runs_on_a_fake_node(cluster: Cluster, namespace: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "namespace": namespace},
        "spec": {"containers": [{"name": "c", "image": "example.invalid/none:1"}]},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/probe", "--timeout=60s")
    got = json.loads(cluster.kubectl("get", "-n", namespace, "pod/probe", "-o", "json").stdout)
    assert got["spec"]["nodeName"].startswith("kwok-node-")
    assert got["status"]["phase"] == "Running"
