"""The shop end to end on kind: real pods, images built here, the chart installed with helm.

``make e2e-kind`` (NATSMESH_E2E_KIND=1) on a machine with Docker: ``hack/kind.sh
up`` builds the kind node image offline (kubelet, containerd, the component
images, all from the Go module proxy) and creates a two-node cluster (or
reuses ``NATSMESH_KIND_CLUSTER`` if it exists), and loads the operator,
sidecar, demo-app and NATS images built by ``hack/images.sh``. The test then
``helm install``s charts/natsmesh (one operator replica, one NATS server
on a PVC), applies the shop and its Deployments, reaches the pods with
``kubectl port-forward`` and runs the same scenarios as the local flavour
(tests/e2e/shop.py). Finally ``helm uninstall`` must leave nothing of the
release behind but what the chart keeps on purpose (the CRDs with
``crds.keep``, the NATS bootstrap Secret). The cluster is deleted unless it
was reused or ``NATSMESH_KIND_KEEP=1``.

Skips with the reason where Docker is absent.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e import kindshop
from tests.e2e import shop as scenarios

pytestmark = [pytest.mark.e2e, pytest.mark.kind, pytest.mark.timeout(900)]

REPO = scenarios.REPO
RELEASE = "natsmesh"
SYSTEM_NS = "natsmesh-system"
SIDECAR = kindshop.SIDECAR


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
    def __init__(self, name: str, kubeconfig: Path, disposable: bool = False) -> None:
        self.name = name
        self.kubeconfig = kubeconfig
        #: The cluster is deleted after this module: what is in it need not be
        #: waited out on the way down (a namespace's pods draining).
        self.disposable = disposable
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


def _image_names() -> dict[str, str]:
    out = run(str(REPO / "hack" / "images.sh"), "--print").split()
    return dict(zip(("base", "build", "sidecar", "operator", "app", "stock"), out, strict=True))


@pytest.fixture(scope="module")
def kind() -> Iterator[Kind]:
    name = os.environ.get("NATSMESH_KIND_CLUSTER", "natsmesh-e2e")
    env = {**os.environ, "NATSMESH_KIND_CLUSTER": name}
    # An engine first (installed and started if missing; idempotent): `kind
    # get clusters` fails outright without one.
    run(str(REPO / "hack" / "docker.sh"), "up", timeout=900)
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
    disposable = name not in existing and not os.environ.get("NATSMESH_KIND_KEEP")
    try:
        yield Kind(name, kubeconfig, disposable)
    finally:
        if disposable:
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
        # On the cluster's default StorageClass (local-path): the NATS pod's
        # streams and account JWTs outlive it (test_nats_pod_deleted_...).
        "--set", "nats.jetstream.persistence.size=2Gi",
        "--set", "nats.jetstream.maxFileStore=2Gi",
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
    pods: dict[str, str]


@pytest.fixture(scope="module")
def shop(release: Kind, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KindShop]:
    kind = release
    ns = f"shop-e2e-{uuid.uuid4().hex[:6]}"
    kind.kubectl("create", "namespace", ns)
    kind.kubectl("label", "namespace", ns, "natsmesh.io/inject=enabled")
    forwarded: kindshop.ForwardedShop | None = None
    try:
        # The shop with its gRPC service (stock, natsmesh/example-stock).
        kind.kubectl("apply", "-n", ns, "-f", str(scenarios.SHOP), "-f", str(scenarios.SHOP_GRPC))
        kind.kubectl(
            "wait", "-n", ns, "--for=condition=Ready", "--timeout=120s",
            "natsservices", "--all",
        )  # fmt: skip
        kind.kubectl(
            "apply", "-n", ns, "-f", str(scenarios.SHOP_APPS), "-f", str(scenarios.SHOP_GRPC_APPS)
        )  # fmt: skip
        for deploy in ("gateway", "orders-v1", "orders-v2", "payments", "inventory", "stock"):
            kind.kubectl("rollout", "status", "-n", ns, f"deploy/{deploy}", "--timeout=180s")
        forwarded = kindshop.forward_shop(
            [kind.kubectl_bin, "--kubeconfig", str(kind.kubeconfig)],
            ns,
            tmp_path_factory.mktemp("port-forward"),
        )
        e = forwarded.endpoints
        endpoints = KindShop(ns, e.gateway, e.outbound, e.admin, e.app)
        endpoints.pods = forwarded.pods
        scenarios.warm_up(endpoints, timeout=60)
        yield endpoints
    finally:
        if forwarded is not None:
            forwarded.close()
        kind.kubectl(
            "delete", "natsservices,natsroutes", "--all", "-n", ns, "--timeout=120s",
            check=False,
        )  # fmt: skip
        # On a cluster about to be deleted, not waited for (its pods' drain).
        wait = "--wait=false" if kind.disposable else "--timeout=180s"
        kind.kubectl("delete", "namespace", ns, wait, check=False)


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


def test_file_upload_streams_through_the_shop(shop: KindShop) -> None:
    scenarios.check_upload(shop)


def test_order_status_feed_arrives_event_by_event(shop: KindShop) -> None:
    scenarios.check_order_status_feed(shop)


def test_grpc_unary_and_streaming_through_real_pods(shop: KindShop) -> None:
    """The shop's gRPC service on real pods: stock's image (grpcio) behind its
    sidecar speaking h2c to it; a grpcio client at the gateway's sidecar gets
    unary answers, the app's own NOT_FOUND, and a server stream update by
    update; the same call from payments' pod is PERMISSION_DENIED."""
    scenarios.check_grpc_stock(shop)


def test_websocket_echo_through_the_shop(shop: KindShop) -> None:
    scenarios.check_websocket_echo(shop)


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
        assert app["restartCount"] == 0, (resource, app.get("lastState"))


# -- what only a real pod network shows ---------------------------------------

CALL = """
import http.client, socket, sys
host, port, path, vhost = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
try:
    c = http.client.HTTPConnection(host, port, timeout=float(sys.argv[5]))
    c.request("GET", path, headers={"host": vhost} if vhost != "-" else {})
    print(c.getresponse().status)
except (socket.timeout, TimeoutError):
    print("timeout")
except OSError as e:
    print(type(e).__name__)
"""

NATS_HELLO = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(s.recv(5).decode())
except (socket.timeout, TimeoutError):
    print("timeout")
except OSError as e:
    print(type(e).__name__)
"""

#: Long enough for a SYN that is answered; a dropped one never is.
CONNECT_TIMEOUT = "4"
#: What a refused connection looks like: kube-router REJECTs (ICMP port
#: unreachable); a CNI that DROPs gives the timeout.
CLOSED = ("ConnectionRefusedError", "timeout")


def _pod_ip(kind: Kind, ns: str, pod: str) -> str:
    return kind.kubectl("get", "pod", "-n", ns, pod, "-o", "jsonpath={.status.podIP}").strip()


def _py(kind: Kind, ns: str, pod: str, container: str, script: str, *args: str) -> str:
    return kind.kubectl(
        "exec", "-n", ns, pod, "-c", container, "--", "python3", "-c", script, *args, timeout=60
    ).strip()


def _app_container(kind: Kind, ns: str, pod: str) -> tuple[str, int]:
    spec = json.loads(kind.kubectl("get", "pod", "-n", ns, pod, "-o", "json"))["spec"]
    app = spec["containers"][0]
    return str(app["name"]), int(app["ports"][0]["containerPort"])


@pytest.fixture(scope="module")
def intruder(release: Kind) -> Iterator[tuple[str, str]]:
    """A pod in a namespace the mesh does not manage (no injection), with python3."""
    kind = release
    ns = f"intruder-{uuid.uuid4().hex[:6]}"
    kind.kubectl("create", "namespace", ns)
    image = _image_names()["app"]
    overrides = {
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
            "containers": [
                {
                    "name": "intruder",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["python3", "-c", "import time; time.sleep(86400)"],
                }
            ],
        }
    }
    kind.kubectl(
        "run", "intruder", "-n", ns, f"--image={image}", "--restart=Never",
        f"--overrides={json.dumps(overrides)}",
    )  # fmt: skip
    kind.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/intruder", "--timeout=120s")
    try:
        yield ns, "intruder"
    finally:
        kind.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_app_port_is_closed_to_other_pods_and_open_through_the_mesh(
    shop: KindShop, release: Kind, intruder: tuple[str, str]
) -> None:
    """The operator's NetworkPolicy (natsmesh-orders-app) enforced by kube-router:
    a direct call to orders' app port on its pod IP, from another namespace or
    from a meshed pod of its own namespace, is refused, while the app answers
    on that address from inside its pod, the sidecar's admin port on the same
    pod IP answers the same callers, and the same call through the mesh is
    served."""
    kind, ns = release, shop.namespace
    orders = shop.pods["orders"]
    ip = _pod_ip(kind, ns, orders)
    _, port = _app_container(kind, ns, orders)
    gateway = shop.pods["gateway"]
    gw_container, _ = _app_container(kind, ns, gateway)
    kind.kubectl("get", "networkpolicy", "-n", ns, "natsmesh-orders-app")
    # The app listens on the pod IP: from inside its own pod (no policy applies).
    orders_container, _ = _app_container(kind, ns, orders)
    own = _py(kind, ns, orders, orders_container, CALL, ip, str(port), "/version", "-",
              CONNECT_TIMEOUT)  # fmt: skip
    assert own == "200", own
    attackers = [(intruder[0], intruder[1], "intruder"), (ns, gateway, gw_container)]
    for a_ns, a_pod, a_container in attackers:
        direct = _py(kind, a_ns, a_pod, a_container, CALL, ip, str(port), "/version", "-",
                     CONNECT_TIMEOUT)  # fmt: skip
        assert direct in CLOSED, (a_ns, a_pod, direct)
        # The same pod IP, the port the policy admits: the path itself is open.
        admin = _py(kind, a_ns, a_pod, a_container, CALL, ip, "15020", "/healthz", "-",
                    CONNECT_TIMEOUT)  # fmt: skip
        assert admin == "200", (a_ns, a_pod, admin)
    # Through the gateway's sidecar (allowedCallers admits the gateway).
    mesh = _py(kind, ns, gateway, gw_container, CALL, "127.0.0.1", "15001", "/version", "orders",
               CONNECT_TIMEOUT)  # fmt: skip
    assert mesh == "200", mesh


def _nats_target(kind: Kind) -> tuple[str, str]:
    """(client Service host, StatefulSet name) of the chart's NATS."""
    sts = kind.kubectl(
        "get", "statefulset", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/component=nats",
        "-o", "jsonpath={.items[0].metadata.name}",
    ).strip()  # fmt: skip
    return f"{sts}.{SYSTEM_NS}.svc", sts


def test_nats_client_port_is_closed_to_unmeshed_namespaces(
    shop: KindShop, release: Kind, intruder: tuple[str, str]
) -> None:
    """The chart's NATS NetworkPolicy: the client port answers a pod of a meshed
    namespace (natsmesh.io/inject=enabled) and not one of another namespace."""
    kind, ns = release, shop.namespace
    host, _ = _nats_target(kind)
    gateway = shop.pods["gateway"]
    gw_container, _ = _app_container(kind, ns, gateway)
    meshed = _py(kind, ns, gateway, gw_container, NATS_HELLO, host, "4222", CONNECT_TIMEOUT)
    assert meshed == "INFO", meshed  # the first bytes of the server's INFO line
    outside = _py(kind, intruder[0], intruder[1], "intruder", NATS_HELLO, host, "4222",
                  CONNECT_TIMEOUT)  # fmt: skip
    assert outside in CLOSED, outside


STARTER = """
import http.client
c = http.client.HTTPConnection("127.0.0.1", 15001, timeout=10)
try:
    c.request("GET", "/version", headers={"host": "inventory"})
    r = c.getresponse()
    print("first-call", r.status, r.read().decode(), flush=True)
except OSError as e:
    print("first-call", type(e).__name__, e, flush=True)
# Then it serves, like any app that calls out while starting: its sidecar
# joins the queue group (and reports ready) only once this port answers.
import http.server
http.server.HTTPServer(("127.0.0.1", 8080), http.server.BaseHTTPRequestHandler).serve_forever()
"""


def test_new_pod_first_outbound_call_succeeds(shop: KindShop, release: Kind) -> None:
    """A new meshed pod whose app calls another service the moment it starts,
    before it serves: the kubelet starts the app only after the injected
    sidecar has started, whose outbound listener does not wait for the app,
    so that very first call is answered (200), with no restart; the pod is
    Ready once the app serves (the sidecar then joins its queue group)."""
    kind, ns = release, shop.namespace
    image = _image_names()["app"]
    nsvc = {
        "apiVersion": "natsmesh.io/v1alpha1",
        "kind": "NatsService",
        "metadata": {"name": "starter"},
        "spec": {"selector": {"matchLabels": {"app": "starter"}}, "port": 8080},
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "starter", "labels": {"app": "starter"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "starter",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["python3", "-c", STARTER],
                    "ports": [{"containerPort": 8080}],
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65532,
                        "readOnlyRootFilesystem": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": [nsvc]})
    run_apply = subprocess.run(
        [kind.kubectl_bin, "--kubeconfig", str(kind.kubeconfig), "apply", "-n", ns, "-f", "-"],
        input=manifest, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run_apply.returncode == 0, run_apply.stderr
    try:
        kind.kubectl("wait", "-n", ns, "--for=condition=Ready", "nsvc/starter", "--timeout=120s")
        created = subprocess.run(
            [kind.kubectl_bin, "--kubeconfig", str(kind.kubeconfig), "create", "-n", ns, "-f", "-"],
            input=json.dumps(pod), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        kind.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/starter", "--timeout=120s")
        logs = scenarios.wait_until(
            "the starter's first call",
            lambda: kind.kubectl("logs", "-n", ns, "starter", "-c", "starter") or None,
            30,
        )
        first = logs.splitlines()[0].split(" ", 2)
        assert first[:2] == ["first-call", "200"], logs
        assert json.loads(first[2])["service"] == "inventory", logs
        status = json.loads(kind.kubectl("get", "pod", "-n", ns, "starter", "-o", "json"))["status"]
        sidecar = next(c for c in status["initContainerStatuses"] if c["name"] == SIDECAR)
        app = status["containerStatuses"][0]
        assert sidecar["ready"], status
        assert app["restartCount"] == 0, status
        assert sidecar["state"]["running"]["startedAt"] <= app["state"]["running"]["startedAt"]
    finally:
        kind.kubectl("delete", "pod", "-n", ns, "starter", "--ignore-not-found", "--wait=false")
        kind.kubectl("delete", "nsvc", "-n", ns, "starter", "--ignore-not-found", "--timeout=60s")


MEMORY = """
import pathlib
v2 = pathlib.Path("/sys/fs/cgroup/memory.current")
if v2.exists():
    usage, peak = int(v2.read_text()), int(pathlib.Path("/sys/fs/cgroup/memory.peak").read_text())
    stat = dict(l.split() for l in open("/sys/fs/cgroup/memory.stat"))
    inactive = int(stat["inactive_file"])
else:
    d = pathlib.Path("/sys/fs/cgroup/memory")
    usage = int((d / "memory.usage_in_bytes").read_text())
    peak = int((d / "memory.max_usage_in_bytes").read_text())
    stat = dict(l.split() for l in open(d / "memory.stat"))
    inactive = int(stat["total_inactive_file"])
print(usage - inactive, peak)
"""


def _sidecar_memory(kind: Kind, ns: str, pod: str) -> tuple[int, int]:
    """(working set, peak usage) of the sidecar container's cgroup, in bytes."""
    working, peak = _py(kind, ns, pod, SIDECAR, MEMORY).split()
    return int(working), int(peak)


def test_sidecar_memory_under_load_stays_under_its_limit(shop: KindShop, release: Kind) -> None:
    """The gateway's sidecar (every checkout passes it twice: the call out and
    the answer) measured by its container cgroup, idle and after 2,000
    checkouts over 32 connections; the peak stays under the container's limit."""
    kind, ns = release, shop.namespace
    pod = shop.pods["gateway"]
    spec = json.loads(kind.kubectl("get", "pod", "-n", ns, pod, "-o", "json"))["spec"]
    limit = next(c for c in spec["initContainers"] if c["name"] == SIDECAR)["resources"]["limits"]
    assert limit["memory"].endswith("Mi"), limit
    limit_bytes = int(limit["memory"][:-2]) * 2**20
    idle, _ = _sidecar_memory(kind, ns, pod)
    results = scenarios.many(shop.gateway, "GET", "/orders-version", 2000, 32)
    assert sum(1 for r in results if r[0] == 200) == len(results)
    loaded, peak = _sidecar_memory(kind, ns, pod)
    print(
        f"\nsidecar memory (cgroup): idle {idle / 2**20:.1f} MiB, after load "
        f"{loaded / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, limit {limit['memory']}"
    )
    assert peak < limit_bytes, (peak, limit_bytes)


class Traffic:
    """Calls in a loop on a thread until stopped; every outcome kept in order."""

    def __init__(self, call: Callable[[int], tuple[bool, str]]) -> None:
        self.call = call
        self.outcomes: list[tuple[float, bool, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                ok, detail = self.call(i)
            except (OSError, http.client.HTTPException) as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            self.outcomes.append((time.monotonic(), ok, detail))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def ok_since(self, t: float) -> int:
        return sum(1 for at, ok, _ in self.outcomes if ok and at >= t)

    def failures(self) -> list[str]:
        return [detail for _, ok, detail in self.outcomes if not ok]


def checkouts(shop: KindShop, prefix: str) -> Callable[[int], tuple[bool, str]]:
    """The call a Traffic loop makes: one checkout through the gateway."""

    def checkout(i: int) -> tuple[bool, str]:
        status, _, body = scenarios.http(
            "POST", shop.gateway + "/checkout", {"item": "mug", "order_id": f"{prefix}-{i}"},
            timeout=10,
        )  # fmt: skip
        return status == 200, f"{status} {body}"

    return checkout


def test_nats_pod_deleted_mid_traffic_keeps_every_acked_event(
    shop: KindShop, release: Kind
) -> None:
    """orders publishes order.created (file-stored stream) in a loop while the
    NATS pod is deleted: the StatefulSet brings it back on the same PVC and
    every publish that was acked (202) is delivered to inventory and payments."""
    kind = release
    _, sts = _nats_target(kind)
    pod = f"{sts}-0"
    pvc = f"data-{pod}"
    pvc_uid = kind.kubectl("get", "pvc", "-n", SYSTEM_NS, pvc, "-o", "jsonpath={.metadata.uid}")
    assert kind.kubectl("get", "pvc", "-n", SYSTEM_NS, pvc, "-o", "jsonpath={.status.phase}") == (
        "Bound"
    )

    def uid() -> str:
        return kind.kubectl(
            "get", "pod", "-n", SYSTEM_NS, pod, "-o", "jsonpath={.metadata.uid}", check=False
        )  # fmt: skip

    pod_uid = uid()
    run_id = uuid.uuid4().hex[:6]
    acked: list[str] = []

    def publish(i: int) -> tuple[bool, str]:
        key = f"nats-restart-{run_id}-{i}"
        status, _, body = scenarios.http(
            "POST", shop.outbound("orders") + "/_events/order.created",
            {"id": key, "item": "chair"}, headers={"idempotency-key": key}, timeout=5,
        )  # fmt: skip
        if status == 202:
            acked.append(key)
            return True, key
        time.sleep(0.2)
        return False, f"{status} {body}"

    with Traffic(publish) as traffic:
        scenarios.wait_until("acked publishes before", lambda: len(acked) >= 20, 30)
        kind.kubectl("delete", "pod", "-n", SYSTEM_NS, pod, "--wait=false")
        scenarios.wait_until("a new NATS pod", lambda: uid() not in ("", pod_uid), 180)
        kind.kubectl("wait", "-n", SYSTEM_NS, "--for=condition=Ready", f"pod/{pod}",
                     "--timeout=180s", timeout=240)  # fmt: skip
        back = time.monotonic()
        scenarios.wait_until("acked publishes after", lambda: traffic.ok_since(back) >= 20, 120)
    volumes = json.loads(kind.kubectl("get", "pod", "-n", SYSTEM_NS, pod, "-o", "json"))["spec"][
        "volumes"
    ]
    assert {"claimName": pvc} in [v.get("persistentVolumeClaim") for v in volumes], volumes
    assert kind.kubectl(
        "get", "pvc", "-n", SYSTEM_NS, pvc, "-o", "jsonpath={.metadata.uid}"
    ) == pvc_uid  # fmt: skip
    print(f"\nNATS restart: {len(acked)} acked, {len(traffic.failures())} refused while down")

    def all_processed(workload: str) -> Callable[[], bool]:
        def check() -> bool:
            processed = scenarios.deliveries(shop, workload)["processed"]
            return all(k in processed for k in acked)

        return check

    for workload in ("inventory", "payments"):
        scenarios.wait_until(
            f"{workload} processed every acked event", all_processed(workload), 120
        )


def _orders_versions(shop: KindShop, n: int = 20) -> set[str]:
    answers = scenarios.many(shop.gateway, "GET", "/orders-version", n, 4)
    return {body["orders_version"] for status, _, body in answers if status == 200}


def _orders_v1_pods(kind: Kind, ns: str) -> set[str]:
    """orders-v1's pods not being deleted: a draining pod still lists, and
    ``rollout status`` of a scale-down returns while it drains."""
    out = kind.kubectl("get", "pods", "-n", ns, "-l", "app=orders,version=v1", "-o", "json")
    return {
        f"pod/{pod['metadata']['name']}"
        for pod in json.loads(out)["items"]
        if not pod["metadata"].get("deletionTimestamp")
    }


def _assert_prestop_hooks_ran(kind: Kind, ns: str) -> None:
    """orders' app container carries the webhook's preStop hook, and no
    kubelet reported a failed one (a sidecar that refused or missed the
    call would leave its queue group only after its app had stopped)."""
    out = kind.kubectl("get", "pods", "-n", ns, "-l", "app=orders", "-o", "json")
    for pod in json.loads(out)["items"]:
        (app,) = pod["spec"]["containers"]
        get = app["lifecycle"]["preStop"]["httpGet"]
        assert (get["path"], get["port"]) == ("/prestop", 15020), pod["metadata"]["name"]
    failed = kind.kubectl(
        "get", "events", "-n", ns, "--field-selector", "reason=FailedPreStopHook", "-o", "name"
    )  # fmt: skip
    assert failed.split() == [], f"failed preStop hooks: {failed}"


def _gone(kind: Kind, ns: str, pods: set[str]) -> None:
    """Waits until ``pods`` are deleted: every container exited, the sidecar's drain over."""
    if pods:
        kind.kubectl("wait", "--for=delete", "-n", ns, *sorted(pods), "--timeout=120s",
                     timeout=150)  # fmt: skip


def _canary_weights(kind: Kind, ns: str, v1: int, v2: int) -> None:
    patch = [
        {"op": "replace", "path": "/spec/rules/1/destinations/0/weight", "value": v1},
        {"op": "replace", "path": "/spec/rules/1/destinations/1/weight", "value": v2},
    ]
    kind.kubectl("patch", "natsroute", "orders", "-n", ns, "--type=json", "-p", json.dumps(patch))


def test_the_mesh_changing_under_traffic_fails_no_request(shop: KindShop, release: Kind) -> None:
    """Issue 18's change tier, on real pods: checkouts through the gateway
    without pause while orders-v1 scales 1 -> 3 -> 1 (new pods join behind
    their readiness, removed ones drain on a real SIGTERM), the canary route
    shifts 90/10 -> 0/100 -> 90/10, and the operator's pod is deleted and
    replaced. Not one checkout may fail."""
    kind, ns = release, shop.namespace

    steps: list[str] = []
    with Traffic(checkouts(shop, "chg")) as traffic:
        scenarios.wait_until("checkouts before", lambda: traffic.ok_since(0) >= 20, 30)
        kind.kubectl("scale", "-n", ns, "deploy/orders-v1", "--replicas=3")
        kind.kubectl("rollout", "status", "-n", ns, "deploy/orders-v1", "--timeout=180s",
                     timeout=240)  # fmt: skip
        steps.append("orders-v1 scaled to 3")
        before = _orders_v1_pods(kind, ns)
        kind.kubectl("scale", "-n", ns, "deploy/orders-v1", "--replicas=1")
        kind.kubectl("rollout", "status", "-n", ns, "deploy/orders-v1", "--timeout=180s",
                     timeout=240)  # fmt: skip
        removed = before - _orders_v1_pods(kind, ns)
        steps.append("orders-v1 scaled to 1")
        _canary_weights(kind, ns, 0, 100)
        scenarios.wait_until("all of orders on v2", lambda: _orders_versions(shop) == {"v2"}, 60)
        _canary_weights(kind, ns, 90, 10)
        scenarios.wait_until("v1 back", lambda: "v1" in _orders_versions(shop), 60)
        steps.append("canary 90/10 -> 0/100 -> 90/10")
        operator = "app.kubernetes.io/component=operator"
        # Waits until the old pod is gone (its drain included), then for the new one.
        kind.kubectl("delete", "pod", "-n", SYSTEM_NS, "-l", operator, "--timeout=120s")
        kind.kubectl("wait", "pod", "-n", SYSTEM_NS, "-l", operator, "--for=condition=Ready",
                     "--timeout=180s", timeout=240)  # fmt: skip
        steps.append("operator pod replaced")
        # Traffic stays on until the removed pods' drain is over, and a while after.
        _gone(kind, ns, removed)
        done = time.monotonic()
        scenarios.wait_until("checkouts after", lambda: traffic.ok_since(done) >= 20, 90)
    failures = traffic.failures()
    total = len(traffic.outcomes)
    changes = "; ".join(steps)
    print(f"\nchanges under traffic ({changes}): {total} checkouts, {len(failures)} failed")
    assert failures == [], f"{len(failures)} of {total} failed: {failures[:5]}"
    _assert_prestop_hooks_ran(kind, ns)


def test_rolling_update_of_orders_under_traffic_loses_no_request(
    shop: KindShop, release: Kind
) -> None:
    """``kubectl rollout restart deploy/orders-v1`` while the gateway is called
    without pause: real SIGTERM, real endpoints, the new pod's sidecar joining
    the queue group; not one checkout may fail. Runs after every test that
    port-forwards to orders (its pod is replaced)."""
    kind, ns = release, shop.namespace

    with Traffic(checkouts(shop, "roll")) as traffic:
        scenarios.wait_until("checkouts before", lambda: traffic.ok_since(0) >= 20, 30)
        old = _orders_v1_pods(kind, ns)
        kind.kubectl("rollout", "restart", "-n", ns, "deploy/orders-v1")
        kind.kubectl("rollout", "status", "-n", ns, "deploy/orders-v1", "--timeout=180s",
                     timeout=240)  # fmt: skip
        # Traffic stays on until the old pod's drain is over, and a while after.
        _gone(kind, ns, old)
        done = time.monotonic()
        scenarios.wait_until("checkouts after", lambda: traffic.ok_since(done) >= 20, 90)
    failures = traffic.failures()
    total = len(traffic.outcomes)
    print(f"\nrolling update of orders-v1: {total} checkouts, {len(failures)} failed")
    assert failures == [], f"{len(failures)} of {total} failed: {failures[:5]}"
    _assert_prestop_hooks_ran(kind, ns)


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
    # Kept on purpose (chart docs): the NATS trust root and its root key, not
    # release objects, and the NATS data (persistence.retentionPolicy.whenDeleted: Retain).
    kept = [f"persistentvolumeclaim/data-{RELEASE}-nats-0"]
    namespaced = [
        n for n in namespaced if not n.endswith(("-nats-bootstrap", "-nats-bootstrap-root"))
    ]
    assert sorted(namespaced) == kept, namespaced
    kind.kubectl("delete", *kept, "-n", SYSTEM_NS, "--timeout=120s")
    cluster_scoped = kind.kubectl(
        "get", scenarios.RELEASE_CLUSTER_KINDS, "-l", selector, "-o", "name"
    ).split()  # fmt: skip
    assert cluster_scoped == [], cluster_scoped
    # crds.keep=true (the default): the CRDs stay, so NatsServices survive a reinstall.
    kind.kubectl("get", "crd", "natsservices.natsmesh.io", "natsroutes.natsmesh.io")
