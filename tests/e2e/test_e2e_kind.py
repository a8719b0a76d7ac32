"""The shop end to end on kind: real pods, images built here, the chart installed with helm.

``make e2e-kind`` (NATSMESH_E2E_KIND=1) on a machine with Docker: ``hack/kind.sh
up`` builds the kind node image offline (kubelet, containerd, the component
images, all from the Go module proxy) and creates a two-node cluster (or
reuses ``NATSMESH_KIND_CLUSTER`` if it exists), and loads the operator,
sidecar, demo-app and NATS images built by ``hack/images.sh``. The test then
``helm install``s charts/natsmesh (one operator replica, one NATS server
without a PVC), applies the shop and its Deployments, reaches the pods with
``kubectl port-forward`` and runs the same scenarios as the local flavour
(tests/e2e/shop.py). Finally ``helm uninstall`` must leave nothing of the
release behind but what the chart keeps on purpose (the CRDs with
``crds.keep``, the NATS bootstrap Secret). The cluster is deleted unless it
was reused or ``NATSMESH_KIND_KEEP=1``.

Skips with the reason where Docker is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import shop as scenarios

pytestmark = [pytest.mark.e2e, pytest.mark.kind, pytest.mark.timeout(900)]

REPO = scenarios.REPO
RELEASE = "natsmesh"
SYSTEM_NS = "natsmesh-system"
SIDECAR = "natsmesh-sidecar"


def _bin_dirs() -> list[str]:
    dirs: list[str] = []
    for script in ("tools.sh", "kind-tools.sh"):
        try:
            out = subprocess.run(
                [str(REPO / "hack" / script), "--print"],
                capture_output=True, text=True, check=True, timeout=60,
            ).stdout  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            continue
        dirs += out.split()
    return dirs


def _which(name: str) -> str | None:
    for d in _bin_dirs():
        candidate = Path(d) / name
        if candidate.exists():
            return str(candidate)
    return shutil.which(name)


def _skip_reason() -> str | None:
    if not os.environ.get("NATSMESH_E2E_KIND"):
        return "kind e2e runs only with NATSMESH_E2E_KIND=1 (make e2e-kind)"
    if shutil.which("docker") is None and shutil.which("dockerd") is None:
        return "docker is not installed: the kind e2e needs a Docker engine"
    return None


SKIP = _skip_reason()
if SKIP:
    pytestmark.append(pytest.mark.skip(reason=SKIP))


def run(*argv: str, timeout: float = 600, check: bool = True) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return str(proc.stdout)


class Kind:
    def __init__(self, name: str, kubeconfig: Path) -> None:
        self.name = name
        self.kubeconfig = kubeconfig
        self.kubectl_bin = _which("kubectl") or "kubectl"
        self.helm_bin = _which("helm") or "helm"

    def kubectl(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        return run(
            self.kubectl_bin,
            "--kubeconfig",
            str(self.kubeconfig),
            *args,
            timeout=timeout,
            check=check,
        )

    def helm(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        return run(
            self.helm_bin,
            "--kubeconfig",
            str(self.kubeconfig),
            *args,
            timeout=timeout,
            check=check,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"port-forward on 127.0.0.1:{port} did not come up")


def _image_names() -> dict[str, str]:
    out = run(str(REPO / "hack" / "images.sh"), "--print").split()
    return dict(zip(("base", "build", "sidecar", "operator", "app"), out, strict=True))


@pytest.fixture(scope="module")
def kind() -> Iterator[Kind]:
    name = os.environ.get("NATSMESH_KIND_CLUSTER", "natsmesh-e2e")
    env = {**os.environ, "NATSMESH_KIND_CLUSTER": name}
    kind_bin = _which("kind")
    existing = run(kind_bin, "get", "clusters").split() if kind_bin else []
    # Builds what is missing (node image, natsmesh's images), creates the
    # cluster if it does not exist, loads the images: warm, seconds.
    up = subprocess.run(
        [str(REPO / "hack" / "kind.sh"), "up"], env=env, capture_output=True, text=True,
        timeout=3600,
    )  # fmt: skip
    assert up.returncode == 0, f"hack/kind.sh up failed:\n{up.stdout[-3000:]}\n{up.stderr[-5000:]}"
    exports = subprocess.run(
        [str(REPO / "hack" / "kind.sh"), "env"], env=env, capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    kubeconfig = Path(exports.split("KUBECONFIG=", 1)[1].split()[0])
    try:
        yield Kind(name, kubeconfig)
    finally:
        if name not in existing and not os.environ.get("NATSMESH_KIND_KEEP"):
            subprocess.run(
                [str(REPO / "hack" / "kind.sh"), "down"], env=env, capture_output=True, timeout=600
            )


@pytest.fixture(scope="module")
def release(kind: Kind) -> Iterator[Kind]:
    images = _image_names()
    operator_repo, operator_tag = images["operator"].rsplit(":", 1)
    sidecar_repo, sidecar_tag = images["sidecar"].rsplit(":", 1)
    nats_repo, nats_tag = run(str(REPO / "hack" / "kind.sh"), "nats-image").strip().rsplit(":", 1)
    kind.helm(
        "install", RELEASE, str(REPO / "charts" / "natsmesh"),
        "--namespace", SYSTEM_NS, "--create-namespace",
        "--set", f"image.operator.repository={operator_repo}",
        "--set", f"image.operator.tag={operator_tag}",
        "--set", f"image.sidecar.repository={sidecar_repo}",
        "--set", f"image.sidecar.tag={sidecar_tag}",
        "--set", "image.operator.pullPolicy=Never",
        "--set", "image.sidecar.pullPolicy=Never",
        "--set", f"nats.image.repository={nats_repo}",
        "--set", f"nats.image.tag={nats_tag}",
        "--set", "nats.image.pullPolicy=Never",
        "--set", "operator.replicas=1",
        "--set", "nats.replicas=1",
        "--set", "nats.jetstream.persistence.enabled=false",
        "--wait", "--timeout", "5m",
    )  # fmt: skip
    kind.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/natsservices.natsmesh.io", "crd/natsroutes.natsmesh.io",
    )  # fmt: skip
    yield kind
    # The uninstall is a test of its own (test_helm_uninstall_leaves_nothing_behind);
    # this only makes sure it happens.
    kind.helm(
        "uninstall", RELEASE, "--namespace", SYSTEM_NS, "--ignore-not-found", "--wait",
        check=False,
    )  # fmt: skip


class KindShop(scenarios.ShopEndpoints):
    forwards: list[subprocess.Popen[bytes]]
    pods: dict[str, str]


@pytest.fixture(scope="module")
def shop(release: Kind, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KindShop]:
    kind = release
    ns = f"shop-e2e-{uuid.uuid4().hex[:6]}"
    kind.kubectl("create", "namespace", ns)
    kind.kubectl("label", "namespace", ns, "natsmesh.io/inject=enabled")
    forwards: list[subprocess.Popen[bytes]] = []
    logs = tmp_path_factory.mktemp("port-forward")
    try:
        kind.kubectl("apply", "-n", ns, "-f", str(scenarios.SHOP))
        kind.kubectl(
            "wait", "-n", ns, "--for=condition=Ready", "--timeout=120s",
            "natsservices", "--all",
        )  # fmt: skip
        kind.kubectl("apply", "-n", ns, "-f", str(scenarios.SHOP_APPS))
        for deploy in ("gateway", "orders-v1", "orders-v2", "payments", "inventory"):
            kind.kubectl("rollout", "status", "-n", ns, f"deploy/{deploy}", "--timeout=180s")
        pods: dict[str, str] = {}
        ports: dict[str, dict[int, int]] = {}
        for resource, labels in scenarios.WORKLOADS.items():
            selector = ",".join(f"{k}={v}" for k, v in labels.items())
            items = json.loads(kind.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json"))[
                "items"
            ]
            running = [p for p in items if not p["metadata"].get("deletionTimestamp")]
            assert len(running) == 1, f"{resource}: {[p['metadata']['name'] for p in running]}"
            pod = running[0]
            sidecars = [c["name"] for c in pod["spec"].get("initContainers", [])]
            assert SIDECAR in sidecars, f"{resource}: the webhook did not inject the sidecar"
            app_port = int(pod["spec"]["containers"][0]["ports"][0]["containerPort"])
            pods[resource] = pod["metadata"]["name"]
            ports[resource] = {p: _free_port() for p in (app_port, 15001, 15020)}
            log = (logs / f"{resource}.log").open("wb")
            forwards.append(
                subprocess.Popen(
                    [
                        kind.kubectl_bin, "--kubeconfig", str(kind.kubeconfig),
                        "port-forward", "-n", ns, f"pod/{pods[resource]}",
                        *(f"{local}:{remote}" for remote, local in ports[resource].items()),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
            for local in ports[resource].values():
                _wait_port(local)

        def url(resource: str, port: int) -> str:
            return f"http://127.0.0.1:{ports[resource][port]}"

        def app_url(resource: str) -> str:
            app_port = next(p for p in ports[resource] if p not in (15001, 15020))
            return url(resource, app_port)

        endpoints = KindShop(
            namespace=ns,
            gateway=app_url("gateway"),
            outbound=lambda r: url(r, 15001),
            admin=lambda r: url(r, 15020),
            app=app_url,
        )
        endpoints.forwards = forwards
        endpoints.pods = pods
        scenarios.warm_up(endpoints, timeout=60)
        yield endpoints
    finally:
        for fwd in forwards:
            fwd.terminate()
            try:
                fwd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                fwd.kill()
        kind.kubectl(
            "delete", "natsservices,natsroutes", "--all", "-n", ns, "--timeout=120s",
            check=False,
        )  # fmt: skip
        kind.kubectl("delete", "namespace", ns, "--timeout=180s", check=False)


def test_traffic_flows_gateway_orders_payments(shop: KindShop) -> None:
    scenarios.check_chain(shop)


def test_forbidden_calls_are_403(shop: KindShop) -> None:
    scenarios.check_denied(shop)


def test_canary_split_is_90_10(shop: KindShop) -> None:
    scenarios.check_canary(shop)


def test_event_delivered_exactly_once_after_a_failure(shop: KindShop) -> None:
    scenarios.check_event_once(shop)


def test_metrics_count_requests(shop: KindShop) -> None:
    scenarios.check_metrics(shop)


PROBE = """
import errno, os
try:
    open("/natsmesh-probe", "w")
    fs = "rw"
except OSError as e:
    fs = errno.errorcode[e.errno]
caps = next(l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff"))
print(os.getuid(), os.getgid(), fs, caps)
"""


def test_containers_run_as_non_root_with_read_only_root_and_no_caps(
    shop: KindShop, release: Kind
) -> None:
    """Checked from inside each running container, app and injected sidecar alike."""
    for resource, pod in shop.pods.items():
        spec = json.loads(release.kubectl("get", "pod", "-n", shop.namespace, pod, "-o", "json"))
        for container in (spec["spec"]["containers"][0]["name"], SIDECAR):
            out = release.kubectl(
                "exec", "-n", shop.namespace, pod, "-c", container, "--",
                "python3", "-c", PROBE,
            ).split()  # fmt: skip
            assert out == ["65532", "65532", "EROFS", "0000000000000000"], (resource, container)


def test_native_sidecar_is_ready_before_the_app_starts(shop: KindShop, release: Kind) -> None:
    """The kubelet starts the app only once the sidecar (an init container with
    restartPolicy Always) passed its startup/readiness: real ordering, not emulated."""
    for resource, pod in shop.pods.items():
        status = json.loads(release.kubectl("get", "pod", "-n", shop.namespace, pod, "-o", "json"))[
            "status"
        ]
        sidecar = next(c for c in status["initContainerStatuses"] if c["name"] == SIDECAR)
        app = status["containerStatuses"][0]
        assert sidecar["started"], resource
        assert sidecar["ready"], resource
        sidecar_started = sidecar["state"]["running"]["startedAt"]
        app_started = app["state"]["running"]["startedAt"]
        assert sidecar_started <= app_started, (resource, sidecar_started, app_started)
        # A container that crashed before its first call would show restarts.
        assert app["restartCount"] == 0, resource


def test_helm_uninstall_leaves_nothing_behind(shop: KindShop, release: Kind) -> None:
    """Runs last in this module (pytest keeps file order): removes the shop, then the release."""
    kind = release
    ns = shop.namespace
    kind.kubectl("delete", "natsservices,natsroutes", "--all", "-n", ns, "--timeout=120s")
    kind.helm("uninstall", RELEASE, "--namespace", SYSTEM_NS, "--wait", "--timeout", "5m")
    selector = f"app.kubernetes.io/instance={RELEASE}"
    # Real pods terminate gracefully (NATS lame duck, the operator's drain):
    # helm is done when their owners are gone, the pods follow.
    kind.kubectl(
        "wait", "--for=delete", "pods", "-l", selector, "-n", SYSTEM_NS, "--timeout=180s",
        timeout=240,
    )  # fmt: skip
    namespaced = kind.kubectl(
        "get", scenarios.RELEASE_KINDS, "-n", SYSTEM_NS, "-l", selector, "-o", "name"
    ).split()  # fmt: skip
    # Kept on purpose (chart docs): the NATS trust root and its root key, not release objects.
    namespaced = [
        n for n in namespaced if not n.endswith(("-nats-bootstrap", "-nats-bootstrap-root"))
    ]
    assert namespaced == [], namespaced
    cluster_scoped = kind.kubectl(
        "get", scenarios.RELEASE_CLUSTER_KINDS, "-l", selector, "-o", "name"
    ).split()  # fmt: skip
    assert cluster_scoped == [], cluster_scoped
    # crds.keep=true (the default): the CRDs stay, so NatsServices survive a reinstall.
    kind.kubectl("get", "crd", "natsservices.natsmesh.io", "natsroutes.natsmesh.io")
