"""The chart on the local control plane: ``helm install`` with its pods emulated.

kwok nodes run nothing, so :class:`LocalRelease` plays the nodes' part for the
namespaces it is given: a :class:`~tests.e2e.podsim.PodSim` per namespace runs
the pods that land there (the operator replicas, NATS, the bootstrap hook Job,
later the shop's pods) as local processes, and one
:class:`~tests.e2e.netsim.ServiceNetwork` connects them through their Services,
including the API server's calls to the chart's webhooks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import shop as scenarios
from tests.e2e.netsim import ServiceNetwork
from tests.e2e.podsim import PodSim
from tests.fixtures.cluster import REPO, Cluster, fresh_namespace, tool

log = logging.getLogger("e2e.local")

CHART = REPO / "charts" / "natsmesh"
RELEASE = "natsmesh"
MESH_CRDS = ("natsservices.natsmesh.io", "natsroutes.natsmesh.io")
#: What the local flavour changes from the chart's defaults: one NATS server
#: without a PVC (kwok has no volume provisioner).
LOCAL_VALUES = (
    "nats.replicas=1",
    "nats.jetstream.persistence.enabled=false",
)


#: The local flavour's tests step aside when the kind flavour is asked for.
LOCAL_ONLY = pytest.mark.skipif(
    bool(os.environ.get("NATSMESH_E2E_KIND")),
    reason="NATSMESH_E2E_KIND is set: the kind flavour (test_e2e_kind.py) runs instead",
)


class LocalRelease:
    """One helm release of charts/natsmesh, its pods and the pods of ``watch`` namespaces."""

    def __init__(self, cluster: Cluster, name: str, namespace: str, workdir: Path) -> None:
        self.cluster = cluster
        self.name = name
        self.namespace = namespace
        self.workdir = workdir
        self.kubectl_argv = [tool("kubectl"), "--kubeconfig", str(cluster.kubeconfig)]
        self.network = ServiceNetwork(self.kubectl_argv, cluster.service_proxy)
        self.sims: dict[str, PodSim] = {}

    # -- commands ---------------------------------------------------------------

    def helm(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        proc = subprocess.run(
            [tool("helm"), "--kubeconfig", str(self.cluster.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}\n{self.describe()}")
        return proc.stdout + proc.stderr

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> str:
        return self.cluster.kubectl(*args, input=input, check=check, timeout=timeout).stdout

    # -- pods ---------------------------------------------------------------------

    def start(self) -> LocalRelease:
        self.network.start()
        self.watch(self.namespace)
        return self

    def watch(self, namespace: str) -> PodSim:
        """Emulate the pods of ``namespace`` from now on."""
        if namespace not in self.sims:
            self.sims[namespace] = PodSim(
                self.kubectl_argv, namespace, self.workdir / namespace, network=self.network
            ).start()
        return self.sims[namespace]

    def stop(self) -> None:
        for sim in self.sims.values():
            sim.stop()
        self.network.stop()

    def describe(self) -> str:
        return "\n".join(f"== {ns}\n{sim.describe()}" for ns, sim in self.sims.items())

    # -- the release ----------------------------------------------------------------

    def adopt_crds(self) -> None:
        """Mesh CRDs created before (``kubectl apply -f crds/``) become this release's.

        Helm refuses to install over objects it does not own; these labels and
        annotations are how it adopts them (docs/chart.md).
        """
        for crd in MESH_CRDS:
            if self.kubectl("get", "crd", crd, "--ignore-not-found", "-o", "name").strip():
                self.kubectl(
                    "label", "--overwrite", "crd", crd, "app.kubernetes.io/managed-by=Helm"
                )
                self.kubectl(
                    "annotate", "--overwrite", "crd", crd,
                    f"meta.helm.sh/release-name={self.name}",
                    f"meta.helm.sh/release-namespace={self.namespace}",
                )  # fmt: skip

    def install(self, *values: str, timeout: str = "3m") -> str:
        self.adopt_crds()
        args = [f"--set={v}" for v in values]
        return self.helm(
            "install", self.name, str(CHART), "--namespace", self.namespace,
            "--create-namespace", "--timeout", timeout, *args,
            timeout=240,
        )  # fmt: skip

    def install_running(self, *values: str) -> None:
        """The local flavour (LOCAL_VALUES) plus ``values``, installed, with the
        mesh CRDs established, NATS and both operator replicas ready."""
        self.install(*LOCAL_VALUES, *values)
        self.kubectl(
            "wait", "--for=condition=Established", "--timeout=30s",
            *(f"crd/{n}" for n in MESH_CRDS),
        )  # fmt: skip
        self.wait_ready("nats", 1)
        self.wait_ready("operator", 2)

    def uninstall(self, check: bool = True) -> str:
        return self.helm(
            "uninstall", self.name, "--namespace", self.namespace, "--wait", "--timeout", "2m",
            "--ignore-not-found", check=check, timeout=180,
        )  # fmt: skip

    def wait_ready(self, component: str, count: int, timeout: float = 90) -> None:
        """``count`` emulated pods of a chart component pass their probes."""
        self.sims[self.namespace].wait_ready(
            count, timeout=timeout, **{"app.kubernetes.io/component": component}
        )

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.describe()}")

    def leftovers(self) -> list[str]:
        """Objects of this release still in the cluster (namespaced and cluster-scoped)."""
        selector = f"app.kubernetes.io/instance={self.name}"
        found = self.kubectl(
            "get", scenarios.RELEASE_KINDS, "-n", self.namespace, "-l", selector, "-o", "name"
        ).split()  # fmt: skip
        found += self.kubectl(
            "get", scenarios.RELEASE_CLUSTER_KINDS, "-l", selector, "-o", "name"
        ).split()  # fmt: skip
        return found

    def ready_count(self, namespace: str, kinds: str = "natsservices,natsroutes") -> int:
        """How many of ``kinds`` (``kind`` or ``kind/name`` too) have ``Ready=True``."""
        found = json.loads(self.kubectl("get", kinds, "-n", namespace, "-o", "json"))
        items = found.get("items", [found])  # a list, or one object
        return sum(
            any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in (i.get("status") or {}).get("conditions", [])
            )
            for i in items
        )

    def wait_resource_ready(self, kind: str, name: str, namespace: str, timeout: float) -> None:
        try:
            self.wait_for(
                f"{kind} {namespace}/{name} Ready",
                lambda: self.ready_count(namespace, f"{kind}/{name}") == 1,
                timeout,
            )
        except AssertionError as exc:
            # The resource's own conditions say why; the pods' logs come after.
            found = self.kubectl(
                "get", f"{kind}/{name}", "-n", namespace, "-o", "jsonpath={.status}", check=False
            )
            raise AssertionError(f"{kind} {namespace}/{name} status: {found}\n{exc}") from None

    def secret_data(self, name: str) -> dict[str, str]:
        out = json.loads(self.kubectl("get", "secret", name, "-n", self.namespace, "-o", "json"))
        return dict(out.get("data") or {})


@contextlib.contextmanager
def local_release(cluster: Cluster, prefix: str, workdir: Path) -> Iterator[LocalRelease]:
    """A fresh namespace with the emulation running; uninstalled and removed afterwards."""
    with fresh_namespace(cluster, prefix, digits=6) as ns:
        release = LocalRelease(cluster, RELEASE, ns, workdir).start()
        try:
            yield release
        finally:
            release.uninstall(check=False)
            release.stop()


def snapshot(sims: Mapping[str, PodSim]) -> dict[str, list[dict[str, Any]]]:
    """The emulated pods and their local ports, for processes other than the emulator."""
    return {
        ns: [
            {
                "name": pod.name,
                "labels": pod.labels,
                "ready": pod.ready,
                # A pod that cannot start: its error and its containers' log
                # tails, for the demo to show at once instead of waiting.
                "error": pod.error,
                "describe": pod.describe(chars=1500) if pod.error else "",
                "ports": {str(k): v for k, v in pod.ports.items()},
                "containers": {
                    c["name"]: [int(p["containerPort"]) for p in c.get("ports") or []]
                    for c in pod.spec.get("containers") or []
                },
            }
            for pod in sim.select()
        ]
        for ns, sim in sims.items()
    }


def main(argv: list[str] | None = None) -> int:
    """Emulate the kwok nodes for some namespaces until SIGTERM (hack/demo.sh runs this)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--workdir", required=True, help="pods' directories and pods.json")
    parser.add_argument("namespaces", nargs="+")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    workdir = Path(args.workdir)
    first, *others = args.namespaces
    nodes = LocalRelease(Cluster(Path(args.kubeconfig)), RELEASE, first, workdir).start()
    for ns in others:
        nodes.watch(ns)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    registry = workdir / "pods.json"
    try:
        while not stop.wait(1.0):
            tmp = registry.with_suffix(".tmp")
            tmp.write_text(json.dumps(snapshot(nodes.sims), indent=1))
            os.replace(tmp, registry)
    finally:
        nodes.stop()
        registry.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
