"""The chart's NATS cluster (``nats.replicas=3``) on the local control plane.

Three NATS pods of the StatefulSet run emulated and find each other through
the routes the chart writes (``<pod>.<headless service>.<ns>.svc:6222``): one
JetStream meta group of three with a leader; a NatsService whose stream asks
for three replicas becomes Ready, and the stream is placed on all three.
(No PVCs: kwok has no volume provisioner.)
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.local import LOCAL_ONLY, LocalRelease, local_release
from tests.e2e.podsim import SimPod
from tests.fixtures.cluster import Cluster, nats_service

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180), LOCAL_ONLY]

NATS = {"app.kubernetes.io/component": "nats"}


@pytest.fixture(scope="module")
def clustered(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRelease]:
    with local_release(cluster, "natsmesh-cluster", tmp_path_factory.mktemp("pods")) as release:
        # Route TLS off: podsim rewrites the routes' pod DNS names to 127.0.0.1:<port>,
        # which no route certificate names, so the TLS handshake cannot verify here
        # (tests/security/test_security_routes.py runs the routes with TLS). The
        # route credentials still apply.
        release.install(
            "nats.replicas=3",
            "nats.jetstream.persistence.enabled=false",
            "nats.cluster.tls.enabled=false",
        )
        release.wait_ready("nats", 3, timeout=120)
        release.wait_ready("operator", 2)
        yield release


def monitor(pod: SimPod, path: str) -> Any:
    with urllib.request.urlopen(pod.url(8222, path), timeout=5) as r:  # noqa: S310 - http only
        return json.load(r)


def nats_pods(release: LocalRelease) -> list[SimPod]:
    return release.sims[release.namespace].select(**NATS)


def test_three_servers_form_one_jetstream_cluster(clustered: LocalRelease) -> None:
    pods = nats_pods(clustered)
    assert sorted(p.name for p in pods) == [f"natsmesh-nats-{i}" for i in range(3)]

    def meta_formed() -> bool:
        groups = [monitor(p, "/jsz").get("meta_cluster") or {} for p in pods]
        return all(g.get("cluster_size") == 3 and g.get("leader") for g in groups)

    clustered.wait_for("a JetStream meta group of three with a leader", meta_formed, timeout=60)
    leaders = {monitor(p, "/jsz")["meta_cluster"]["leader"] for p in pods}
    assert len(leaders) == 1
    for pod in pods:
        remotes = {r["remote_name"] for r in monitor(pod, "/routez")["routes"]}
        assert remotes == {p.name for p in pods} - {pod.name}


def test_a_replicated_stream_on_the_cluster(clustered: LocalRelease) -> None:
    ns = f"team-{uuid.uuid4().hex[:6]}"
    clustered.kubectl("create", "namespace", ns)
    try:
        manifest = nats_service(
            "ledger",
            events={
                "stream": {"replicas": 3, "storage": "file"},
                "publishes": [{"topic": "entry.posted"}],
            },
        )
        clustered.kubectl("apply", "-n", ns, "-f", "-", input=manifest)

        clustered.wait_resource_ready("natsservice", "ledger", ns, timeout=60)
        # Every server hosts a replica (/jsz lists the streams the server holds),
        # and each sees the same three peers.
        for pod in nats_pods(clustered):
            streams = [
                st
                for account in monitor(pod, "/jsz?accounts=true&streams=true")["account_details"]
                for st in account.get("stream_detail") or []
                if st["name"] == "EVENTS_ledger"
            ]
            assert len(streams) == 1, f"{pod.name} holds no replica of EVENTS_ledger"
            group = streams[0]["cluster"]
            peers = {pod.name, group["leader"], *(r["name"] for r in group["replicas"])}
            assert peers == {p.name for p in nats_pods(clustered)}, json.dumps(group)
    finally:
        clustered.kubectl(
            "delete", "natsservices", "--all", "-n", ns, "--timeout=60s", check=False, timeout=90
        )
        clustered.kubectl("delete", "namespace", ns, "--wait=false", check=False)
