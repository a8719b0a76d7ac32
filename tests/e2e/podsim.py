"""Pods of kwok nodes emulated as local processes: the injected pod spec is what runs.

kwok marks pods Running without executing anything. :class:`PodSim` watches the
pods of one namespace and, for each Running pod, starts its containers as
local processes the way a kubelet would:

* images map to local commands (``natsmesh/sidecar:*`` -> ``python -m
  natsmesh_sidecar``, ``natsmesh/example-shop:*`` -> ``python -m
  examples.apps.shop``, ``natsmesh/example-stock:*`` -> ``python -m
  examples.apps.stock``); the container's ``args`` follow;
* the environment is the container's ``env``/``envFrom`` (plain values,
  ``secretKeyRef``, ``configMapKeyRef``, ``fieldRef``, ``$(VAR)`` references),
  nothing of the test process leaks in;
* Secret, ConfigMap and emptyDir volumes are materialised in a directory per
  pod, and any env value or arg under a volumeMount's ``mountPath`` (such as
  ``NATSMESH_CREDS_FILE``) is rewritten to that directory;
* native sidecars (init containers with ``restartPolicy: Always``) start
  first and must pass their startupProbe before the app containers start;
  other init containers run to completion; exited containers are restarted;
* probes (``httpGet``, ``tcpSocket``) are polled to decide readiness;
* pods that run to completion (``restartPolicy: Never``/``OnFailure``, such
  as a Job's) are reported ``Succeeded``/``Failed`` in the pod's status when
  their containers exit, so Jobs (and Helm hooks) complete as on a kubelet;
* projected and downwardAPI volumes are materialised too; the service account
  token comes from the TokenRequest API, bound to the pod. Client libraries
  read it from the fixed path /var/run/secrets/kubernetes.io/serviceaccount,
  which cannot be remapped per pod, so a container that mounts it also gets
  ``KUBECONFIG`` naming a kubeconfig with that token and CA: it talks to the
  API server as its service account, under the RBAC the chart grants it.

With a :class:`tests.e2e.netsim.ServiceNetwork`, Service addresses
(``<svc>.<ns>.svc:<port>``) in env values, args and configuration files go to
local forwarders to the pods behind them, and the API server reaches
Service-backed webhooks through the network's proxy.

Emulation-only differences, because every pod shares this host's loopback:
every port a pod names (containerPorts, ``*PORT`` env values) is remapped to a
free local port per pod, in ``*PORT`` values and in ``127.0.0.1:N``/``localhost:N``
inside any value (``0.0.0.0:N`` becomes ``127.0.0.1:N``), and in configuration
files (``*.conf``, ``*.yaml``, ``*.json``...) of Secret and ConfigMap volumes,
where mount paths are rewritten to the pod's directory as well; app
containers of a pod with a sidecar get ``NATSMESH_OUTBOUND`` pointing at that
pod's sidecar (unless ``HTTP_PROXY``/``NATSMESH_OUTBOUND`` is set), and
``HOST``/``NATSMESH_ADMIN_HOST`` default to 127.0.0.1 so nothing listens
beyond loopback. Secret and ConfigMap volumes are re-synced every
``volume_sync`` seconds (as the kubelet does, faster), env values are not.

Also a CLI for the demo::

    python -m tests.e2e.podsim --kubeconfig K --namespace shop [--kubectl PATH]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.fixtures.ports import free_port

if TYPE_CHECKING:
    from tests.e2e.netsim import ServiceNetwork

log = logging.getLogger("podsim")

REPO = Path(__file__).resolve().parents[2]

#: Image repository (without registry host, tag or digest) -> local entrypoint.
DEFAULT_IMAGES: dict[str, list[str]] = {
    "natsmesh/sidecar": [sys.executable, "-m", "natsmesh_sidecar"],
    "natsmesh/operator": [sys.executable, "-m", "natsmesh_operator.cli"],
    "natsmesh/example-shop": [sys.executable, "-m", "examples.apps.shop"],
    # The shop's gRPC service (examples/shop/grpc): needs grpcio, which the
    # dev venv has and the standard-library example image does not.
    "natsmesh/example-stock": [sys.executable, "-m", "examples.apps.stock"],
    "nats": ["nats-server"],
}
#: Commands (``command[0]`` of a container) other than python -> local program.
DEFAULT_COMMANDS: dict[str, str] = {
    "nats-server": str(Path(sys.executable).parent / "nats-server"),
}
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: Files of Secret/ConfigMap volumes whose text gets paths and addresses rewritten.
CONFIG_SUFFIXES = (".conf", ".cfg", ".ini", ".json", ".yaml", ".yml", ".toml", ".properties")
COMPLETION_TIMEOUT = 300.0
#: Upper bounds on what one pod may take (a real kubelet would retry forever).
START_TIMEOUT = 60.0
STOP_GRACE_MAX = 10.0
KUBECTL_TIMEOUT = 20.0
RESTART_BACKOFF = 1.0

JsonDict = dict[str, Any]
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_LOOPBACK_PORT = re.compile(r"(127\.0\.0\.1|localhost|0\.0\.0\.0):(\d+)")


class PodSimError(Exception):
    """The pod cannot be emulated (unknown image, missing Secret, failed init...)."""


def image_repository(image: str) -> str:
    """``registry:5000/natsmesh/sidecar:0.1.0@sha256:..`` -> ``registry:5000/natsmesh/sidecar``."""
    ref = image.split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def local_argv(
    local: Sequence[str], spec_args: Sequence[str], rewrite: Callable[[str], str]
) -> list[str]:
    """A container's process argv: ``local`` as it is, then the pod spec's words rewritten.

    ``local`` is this host's program and its own arguments (the venv's
    interpreter and ``-m natsmesh_sidecar``, the nats-server binary): paths
    of this machine, never of the pod's filesystem. Only what the pod spec
    says (``command[1:]``, ``args``) goes through ``rewrite`` (``$(VAR)``,
    ports, volume mount paths). Rewriting the interpreter too mapped a clone
    under /tmp into the pod's /tmp emptyDir, and no pod could start.
    """
    return [*local, *(rewrite(a) for a in spec_args)]


def entrypoint_for(image: str, images: Mapping[str, Sequence[str]]) -> list[str] | None:
    repo = image_repository(image)
    for name, argv in images.items():
        if repo == name or repo.endswith("/" + name):
            return list(argv)
    return None


# --------------------------------------------------------------------------
# One container, one pod
# --------------------------------------------------------------------------


@dataclass
class ContainerProc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    spec: JsonDict
    sidecar: bool = False
    """An init container with restartPolicy Always (a native sidecar)."""
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    exited_at: float | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            out.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.exited_at = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def wait(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return False
        return True

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class SimPod:
    name: str
    uid: str
    namespace: str
    labels: dict[str, str]
    spec: JsonDict
    dir: Path
    ports: dict[int, int] = field(default_factory=dict)
    """Port the pod spec names -> local port of this emulated pod."""
    init: list[ContainerProc] = field(default_factory=list)
    containers: list[ContainerProc] = field(default_factory=list)
    ready: bool = False
    error: str = ""
    stopping: bool = False
    thread: threading.Thread | None = None
    phase: str = "Running"
    """Succeeded/Failed once a run-to-completion pod's containers exited."""
    config_transform: Callable[[str, bytes], bytes] | None = None
    """Rewrites this pod's configuration files (PodSim._config_transform)."""

    @property
    def restart_policy(self) -> str:
        return str(self.spec.get("restartPolicy") or "Always")

    def container_port(self, target: int | str) -> int | None:
        """A Service's ``targetPort`` (number or port name) as this pod's containerPort."""
        if isinstance(target, int) or str(target).isdigit():
            return int(target)
        for c in [*(self.spec.get("initContainers") or []), *(self.spec.get("containers") or [])]:
            for p in c.get("ports") or []:
                if p.get("name") == target:
                    return int(p["containerPort"])
        return None

    def all_containers(self) -> list[ContainerProc]:
        return [*self.init, *self.containers]

    def container(self, name: str) -> ContainerProc:
        for c in self.all_containers():
            if c.name == name:
                return c
        raise KeyError(f"pod {self.name} has no container {name}")

    def has_sidecar(self, name: str = "natsmesh-sidecar") -> bool:
        return any(c.name == name and c.sidecar for c in self.init)

    def port(self, port: int) -> int:
        """The local port of a port the spec names (e.g. 8080, 15001, 15020)."""
        return self.ports[port]

    def url(self, port: int, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port(port)}{path}"

    def restarts(self) -> int:
        return sum(c.restarts for c in self.all_containers())

    def describe(self, chars: int = 2000) -> str:
        lines = [
            f"pod {self.name}: ready={self.ready} error={self.error or '-'} ports={self.ports}"
        ]
        for c in self.all_containers():
            state = "running" if c.alive() else f"exited({c.proc and c.proc.returncode})"
            lines.append(f"  container {c.name} {state} restarts={c.restarts} log={c.log_path}")
            lines.extend("    | " + line for line in c.tail(chars).splitlines()[-25:])
        return "\n".join(lines)


# --------------------------------------------------------------------------
# Building a container's process from the pod spec
# --------------------------------------------------------------------------


def _base_env(pod_dir: Path, pod_name: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(pod_dir),
        "LANG": "C.UTF-8",
        "HOSTNAME": pod_name,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        # The repo root: examples.apps.* and, for a source checkout, the packages.
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "sidecar"), str(REPO / "operator")]),
    }


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion (unknown references stay as written)."""
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def _field_ref(pod: JsonDict, path: str) -> str:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        # Every emulated pod is this host's loopback.
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    raise PodSimError(f"fieldRef {path} is not emulated")


def _literal(value: str, _match: re.Match[str]) -> str:
    return value


def _mount_pattern(mount: str) -> re.Pattern[str]:
    """``mount`` as a whole path (or path prefix) inside configuration text."""
    return re.compile(r"(?<![\w./-])" + re.escape(mount) + r"(?=/|[\s\"',;\]}]|$)")


def _volume_source(vol: JsonDict) -> tuple[str, str, JsonDict] | None:
    """(kind, object name, volume source) of a Secret or ConfigMap volume."""
    if "secret" in vol:
        src = vol["secret"] or {}
        return "secret", src.get("secretName", ""), src
    if "configMap" in vol:
        src = vol["configMap"] or {}
        return "configmap", src.get("name", ""), src
    return None


def _project(
    path: Path,
    kind: str,
    ref: str,
    src: JsonDict,
    data: Mapping[str, bytes],
    transform: Callable[[str, bytes], bytes] = lambda _, b: b,
) -> None:
    """Write the volume's files; a changed file is replaced atomically (rename)."""
    items = src.get("items") or [{"key": k, "path": k} for k in data]
    for item in items:
        if item["key"] not in data:
            if src.get("optional"):
                continue
            raise PodSimError(f"{kind} {ref} has no key {item['key']}")
        target = path / item["path"]
        content = transform(item["path"], data[item["key"]])
        with contextlib.suppress(OSError):
            if target.read_bytes() == content:
                continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(content)
        tmp.chmod(int(item.get("mode", src.get("defaultMode", 0o644))) & 0o777)
        os.replace(tmp, target)


class PodSim:
    """Runs the containers of the Running pods of ``namespace`` as local processes."""

    def __init__(
        self,
        kubectl: Sequence[str],
        namespace: str,
        workdir: Path,
        *,
        images: Mapping[str, Sequence[str]] | None = None,
        poll: float = 0.5,
        selector: str = "",
        volume_sync: float = 2.0,
        network: ServiceNetwork | None = None,
        commands: Mapping[str, str] | None = None,
    ) -> None:
        self.kubectl_argv = list(kubectl)
        self.namespace = namespace
        self.workdir = Path(workdir)
        self.images = dict(DEFAULT_IMAGES if images is None else images)
        self.commands = dict(DEFAULT_COMMANDS if commands is None else commands)
        self.network = network
        if network is not None:
            network.attach(self)
        self._server: str | None = None
        self.poll = poll
        self.selector = selector
        self.pods: dict[str, SimPod] = {}
        self.lock = threading.Lock()
        self.errors: list[str] = []
        #: "<pod>/<container>" of every container SIGKILLed after its grace
        #: (one that ignored or outlived SIGTERM), in order.
        self.killed: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        self.volume_sync = volume_sync
        self._refreshed = 0.0

    # -- kubectl ------------------------------------------------------------

    def kubectl_json(self, *args: str) -> JsonDict:
        out: JsonDict = json.loads(self.kubectl_run(*args, "-o", "json"))
        return out

    def _object(self, kind: str, name: str, optional: bool = False) -> JsonDict | None:
        """A Secret or ConfigMap of the namespace (cached for one pod start)."""
        key = (kind, name)
        cache: dict[tuple[str, str], JsonDict] = self._local.objects
        if key not in cache:
            try:
                cache[key] = self.kubectl_json("get", kind, name)
            except PodSimError:
                if optional:
                    return None
                raise PodSimError(f"{kind} {name} not found (yet)") from None
        return cache[key]

    def _key_of(self, kind: str, name: str, key: str, optional: bool) -> str | None:
        obj = self._object(kind, name, optional)
        if obj is None:
            return None
        data = self._data(kind, obj)
        if key not in data:
            if optional:
                return None
            raise PodSimError(f"{kind} {name} has no key {key}")
        return data[key].decode(errors="replace")

    @staticmethod
    def _data(kind: str, obj: JsonDict) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        if kind == "secret":
            for k, v in (obj.get("data") or {}).items():
                out[k] = base64.b64decode(v)
            for k, v in (obj.get("stringData") or {}).items():
                out[k] = str(v).encode()
        else:
            for k, v in (obj.get("data") or {}).items():
                out[k] = str(v).encode()
            for k, v in (obj.get("binaryData") or {}).items():
                out[k] = base64.b64decode(v)
        return out

    def kubectl_run(self, *args: str, input: str | None = None) -> str:
        proc = subprocess.run(
            [*self.kubectl_argv, "-n", self.namespace, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=KUBECTL_TIMEOUT,
        )
        if proc.returncode != 0:
            raise PodSimError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    @property
    def server(self) -> str:
        """The API server's URL, as the test's kubeconfig names it."""
        if self._server is None:
            self._server = self.kubectl_run(
                "config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}"
            ).strip()
        return self._server

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> PodSim:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="podsim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=KUBECTL_TIMEOUT + 5)
        with self.lock:
            pods = list(self.pods.values())
        threads = [threading.Thread(target=self._stop_pod, args=(p,)) for p in pods]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=3 * STOP_GRACE_MAX)
        # Pods the loop was already stopping (deleted just before) are stopped
        # by daemon threads that die with this process: never leave their
        # processes behind (an operator retrying its last API calls outlives
        # SIGTERM for a while).
        deadline = time.monotonic() + STOP_GRACE_MAX
        for pod in pods:
            for c in pod.all_containers():
                if not c.wait(deadline - time.monotonic()):
                    log.warning("pod %s container %s killed at shutdown", pod.name, c.name)
                    c.signal(signal.SIGKILL)
                    c.wait(5)

    def __enter__(self) -> PodSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception as exc:
                log.warning("podsim reconcile: %s", exc)
                self.errors.append(str(exc))
                del self.errors[:-20]
            self._stop.wait(self.poll)

    def reconcile(self) -> None:
        args = ["get", "pods"] + (["-l", self.selector] if self.selector else [])
        items: list[JsonDict] = self.kubectl_json(*args)["items"]
        seen = set()
        for pod in items:
            meta = pod["metadata"]
            uid = meta["uid"]
            seen.add(uid)
            # Pods this emulation completed stay (phase Succeeded/Failed), like on a node.
            running = (pod.get("status") or {}).get("phase") == "Running"
            deleting = bool(meta.get("deletionTimestamp"))
            with self.lock:
                sim = self.pods.get(uid)
                if sim is None and running and not deleting:
                    sim = self.pods[uid] = self._new_pod(pod)
                    sim.thread = threading.Thread(
                        target=self._start_pod, args=(sim, pod), name=f"pod-{sim.name}", daemon=True
                    )
                    sim.thread.start()
                    continue
            if sim is not None and deleting and not sim.stopping:
                threading.Thread(target=self._stop_pod, args=(sim,), daemon=True).start()
        with self.lock:
            gone = [p for uid, p in self.pods.items() if uid not in seen and not p.stopping]
        for sim in gone:
            threading.Thread(target=self._stop_pod, args=(sim,), daemon=True).start()
        self._restart_exited()
        now = time.monotonic()
        if now - self._refreshed >= self.volume_sync:
            self._refreshed = now
            self._refresh_volumes()

    def _restart_exited(self) -> None:
        now = time.monotonic()
        with self.lock:
            pods = [p for p in self.pods.values() if p.ready and not p.stopping]
        for pod in pods:
            if pod.restart_policy != "Always":
                self._complete(pod)
            for c in [*(c for c in pod.init if c.sidecar), *pod.containers]:
                if c.proc is None or c.alive():
                    continue
                if pod.restart_policy == "Never" and not c.sidecar:
                    continue
                if pod.restart_policy == "OnFailure" and not c.sidecar and c.proc.returncode == 0:
                    continue
                if c.exited_at is None:
                    c.exited_at = now
                    log.warning(
                        "pod %s container %s exited with %s; restarting",
                        pod.name,
                        c.name,
                        c.proc.returncode,
                    )
                elif now - c.exited_at >= RESTART_BACKOFF:
                    c.restarts += 1
                    c.start()

    def _complete(self, pod: SimPod) -> None:
        """A run-to-completion pod whose app containers all exited: report its phase."""
        if pod.phase != "Running" or any(c.alive() or c.proc is None for c in pod.containers):
            return
        codes = [c.proc.returncode if c.proc else 0 for c in pod.containers]
        if pod.restart_policy == "OnFailure" and any(codes):
            return  # restarted in place by _restart_exited, as the kubelet does
        pod.phase = "Succeeded" if not any(codes) else "Failed"
        for c in pod.init:  # native sidecars stop once the main containers are done
            c.signal(signal.SIGTERM)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        statuses = [
            {
                "name": c.name,
                "image": c.spec.get("image", ""),
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": c.restarts,
                "state": {
                    "terminated": {
                        "exitCode": code,
                        "reason": "Completed" if code == 0 else "Error",
                        "startedAt": now,
                        "finishedAt": now,
                    }
                },
            }
            for c, code in zip(pod.containers, codes, strict=True)
        ]
        patch = {
            "status": {
                "phase": pod.phase,
                "containerStatuses": statuses,
                "conditions": [
                    {"type": t, "status": "False", "reason": "PodCompleted"}
                    for t in ("Ready", "ContainersReady")
                ],
            }
        }
        log.info("pod %s completed: %s %s", pod.name, pod.phase, codes)
        try:
            self.kubectl_run(
                "patch", "pod", pod.name, "--subresource=status", "--type=strategic",
                "-p", json.dumps(patch),
            )  # fmt: skip
        except PodSimError as exc:
            pod.phase = "Running"  # try again on the next pass
            log.warning("pod %s: reporting its completion: %s", pod.name, exc)

    # -- one pod --------------------------------------------------------------

    def _new_pod(self, pod: JsonDict) -> SimPod:
        meta = pod["metadata"]
        pod_dir = self.workdir / meta["name"]
        if pod_dir.exists():
            shutil.rmtree(pod_dir, ignore_errors=True)
        pod_dir.mkdir(parents=True)
        return SimPod(
            name=meta["name"],
            uid=meta["uid"],
            namespace=meta.get("namespace", self.namespace),
            labels=dict(meta.get("labels") or {}),
            spec=pod.get("spec") or {},
            dir=pod_dir,
        )

    def _start_pod(self, sim: SimPod, pod: JsonDict) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        try:
            self._prepare(sim, pod, deadline)
            for c in sim.init:
                if sim.stopping:
                    return
                c.start()
                if c.sidecar:
                    self._wait_probe(sim, c, "startupProbe", deadline)
                elif not c.wait(deadline - time.monotonic()) or (c.proc and c.proc.returncode):
                    raise PodSimError(f"init container {c.name} did not complete successfully")
            for c in sim.containers:
                if sim.stopping:
                    return
                c.start()
            for c in sim.all_containers():
                if sim.restart_policy != "Always" and c in sim.containers:
                    continue  # it may be done already: _complete reports it
                if c.sidecar or c in sim.containers:
                    self._wait_probe(sim, c, "startupProbe", deadline)
                    self._wait_probe(sim, c, "readinessProbe", deadline)
            sim.ready = not sim.stopping
            log.info("pod %s ready (ports %s)", sim.name, sim.ports)
        except Exception as exc:
            sim.error = str(exc)
            log.error("pod %s: %s", sim.name, exc)

    def _prepare(self, sim: SimPod, pod: JsonDict, deadline: float) -> None:
        spec = sim.spec
        init_specs = list(spec.get("initContainers") or [])
        specs = list(spec.get("containers") or [])
        # Secrets may come a moment after the pod (the kubelet waits too).
        while True:
            self._local.objects = {}
            try:
                sim.ports = self._port_map([*init_specs, *specs])
                volumes = self._volumes(sim, pod, spec.get("volumes") or [])
                outbound = self._sidecar_outbound(sim, init_specs)
                sim.init = [
                    self._container(sim, pod, c, volumes, outbound=None, init=True)
                    for c in init_specs
                ]
                sim.containers = [
                    self._container(sim, pod, c, volumes, outbound=outbound, init=False)
                    for c in specs
                ]
                return
            except PodSimError as exc:
                if "not found (yet)" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _volumes(self, sim: SimPod, pod: JsonDict, volumes: Iterable[JsonDict]) -> dict[str, Path]:
        out: dict[str, Path] = {}
        transform = self._config_transform(sim)
        for vol in volumes:
            name = vol["name"]
            path = sim.dir / "volumes" / name
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
            out[name] = path
            source = _volume_source(vol)
            if source is not None:
                kind, ref, src = source
                obj = self._object(kind, ref, bool(src.get("optional")))
                data = {} if obj is None else self._data(kind, obj)
                _project(path, kind, ref, src, data, transform)
            elif "projected" in vol:
                for item in (vol["projected"] or {}).get("sources") or []:
                    self._projection(sim, pod, path, item, transform)
            elif "downwardAPI" in vol:
                self._projection(sim, pod, path, vol, transform)
            elif "emptyDir" not in vol:
                log.info("pod %s: volume %s is an empty directory here", sim.name, name)
        return out

    def _projection(
        self,
        sim: SimPod,
        pod: JsonDict,
        path: Path,
        item: JsonDict,
        transform: Callable[[str, bytes], bytes],
    ) -> None:
        """One source of a projected volume (or a downwardAPI volume)."""
        if "serviceAccountToken" in item:
            src = item["serviceAccountToken"]
            argv = [
                "create", "token", sim.spec.get("serviceAccountName") or "default",
                "--duration", f"{int(src.get('expirationSeconds', 3600))}s",
                "--bound-object-kind", "Pod", "--bound-object-name", sim.name,
                "--bound-object-uid", sim.uid,
            ]  # fmt: skip
            if src.get("audience"):
                argv += ["--audience", src["audience"]]
            target = path / src.get("path", "token")
            target.write_text(self.kubectl_run(*argv).strip())
            target.chmod(0o600)
        elif "downwardAPI" in item or "items" in item:
            for entry in (item.get("downwardAPI") or item).get("items") or []:
                if "fieldRef" not in entry:
                    raise PodSimError(f"downwardAPI item {entry} is not emulated")
                (path / entry["path"]).write_text(_field_ref(pod, entry["fieldRef"]["fieldPath"]))
        else:
            source = _volume_source(item)
            if source is None:
                raise PodSimError(f"projected source {sorted(item)} is not emulated")
            kind, ref, src = source
            name = src.get("secretName") or src.get("name") or ""
            obj = self._object(kind, name, bool(src.get("optional")))
            _project(path, kind, ref, src, {} if obj is None else self._data(kind, obj), transform)

    def _config_transform(self, sim: SimPod) -> Callable[[str, bytes], bytes]:
        """Configuration files refer to mount paths and ports of the pod: rewrite them.

        Built once per pod (its mounts and ports do not change), then reused by
        every volume refresh.
        """
        if sim.config_transform is not None:
            return sim.config_transform
        mounts: dict[str, Path] = {}
        for c in [*(sim.spec.get("initContainers") or []), *(sim.spec.get("containers") or [])]:
            for m in c.get("volumeMounts") or []:
                local = sim.dir / "volumes" / m["name"] / m.get("subPath", "")
                mounts.setdefault(m["mountPath"].rstrip("/") or "/", local)
        patterns = [
            (_mount_pattern(mount), str(local))
            for mount, local in sorted(mounts.items(), key=lambda x: -len(x[0]))
            if mount != "/"
        ]

        def transform(name: str, content: bytes) -> bytes:
            if not name.endswith(CONFIG_SUFFIXES):
                return content
            try:
                text = content.decode()
            except UnicodeDecodeError:
                return content
            for pattern, local in patterns:
                # A function, so backslashes in the path are not template escapes.
                text = pattern.sub(functools.partial(_literal, local), text)
            return self._remap(sim, "", text).encode()

        sim.config_transform = transform
        return transform

    def _refresh_volumes(self) -> None:
        """What the kubelet's sync does: Secret and ConfigMap volumes follow their objects.

        The sidecar reloads its creds from the file when the operator reissues them.
        """
        with self.lock:
            pods = [p for p in self.pods.values() if p.ready and not p.stopping]
        if not pods:
            return
        items = self.kubectl_json("get", "secrets,configmaps")["items"]
        objects = {(o["kind"].lower(), o["metadata"]["name"]): o for o in items}
        for pod in pods:
            transform = self._config_transform(pod)
            for vol in pod.spec.get("volumes") or []:
                source = _volume_source(vol)
                if source is None:
                    continue
                kind, ref, src = source
                obj = objects.get((kind, ref))
                if obj is None:
                    continue  # deleted: the kubelet keeps the last contents too
                try:
                    _project(
                        pod.dir / "volumes" / vol["name"],
                        kind,
                        ref,
                        src,
                        self._data(kind, obj),
                        transform,
                    )
                except PodSimError as exc:
                    log.warning("pod %s: volume %s: %s", pod.name, vol["name"], exc)

    def _port_map(self, containers: Iterable[JsonDict]) -> dict[int, int]:
        wanted: set[int] = set()
        for c in containers:
            for p in c.get("ports") or []:
                wanted.add(int(p["containerPort"]))
            for e in c.get("env") or []:
                v = str(e.get("value", ""))
                if e["name"].upper().endswith("PORT") and v.isdigit():
                    wanted.add(int(v))
        # Loopback URLs to other ports (the NATS URL of a local test server) are
        # this host's, not the pod's: only ports the pod itself names move.
        return {p: free_port() for p in sorted(wanted) if p > 0}

    def _sidecar_outbound(self, sim: SimPod, init_specs: Iterable[JsonDict]) -> str | None:
        for c in init_specs:
            if c.get("restartPolicy") != "Always":
                continue
            env = {e["name"]: str(e.get("value", "")) for e in c.get("env") or []}
            if "NATSMESH_LISTEN_PORT" in env:
                port = int(env["NATSMESH_LISTEN_PORT"] or 15001)
                return f"http://127.0.0.1:{sim.ports.get(port, port)}"
        return None

    def _remap(self, sim: SimPod, name: str, value: str) -> str:
        if name.upper().endswith("PORT") and value.isdigit() and int(value) in sim.ports:
            return str(sim.ports[int(value)])

        def sub(m: re.Match[str]) -> str:
            port = int(m.group(2))
            host = "127.0.0.1" if m.group(1) == "0.0.0.0" else m.group(1)
            return f"{host}:{sim.ports.get(port, port)}"

        value = _LOOPBACK_PORT.sub(sub, value)
        return self.network.rewrite(value) if self.network is not None else value

    @staticmethod
    def _mounts(container: JsonDict, volumes: Mapping[str, Path]) -> list[tuple[str, Path]]:
        mounts = []
        for m in container.get("volumeMounts") or []:
            if m["name"] not in volumes:
                raise PodSimError(f"volumeMount {m['name']} names no volume")
            local = volumes[m["name"]] / m.get("subPath", "")
            mounts.append((m["mountPath"].rstrip("/") or "/", local))
        # Longest mount path first, so nested mounts win.
        return sorted(mounts, key=lambda x: -len(x[0]))

    @staticmethod
    def _repath(value: str, mounts: Sequence[tuple[str, Path]]) -> str:
        for mount, local in mounts:
            if value == mount or value.startswith(mount + "/"):
                return str(local) + value[len(mount) :]
        return value

    def _container(
        self,
        sim: SimPod,
        pod: JsonDict,
        c: JsonDict,
        volumes: Mapping[str, Path],
        *,
        outbound: str | None,
        init: bool,
    ) -> ContainerProc:
        name = c["name"]
        entry = entrypoint_for(c.get("image", ""), self.images)
        if entry is None:
            raise PodSimError(f"no local command for image {c.get('image')!r} ({name})")
        command = [str(a) for a in c.get("command") or []]
        spec_args = [str(a) for a in c.get("args") or []]
        if command:
            program = Path(command[0]).name
            if program.startswith("python"):
                local = [sys.executable]
            elif program in self.commands:
                local = [self.commands[program]]
            else:
                raise PodSimError(f"container {name}: command {command} is not emulated")
            spec_args = [*command[1:], *spec_args]
        elif entry and entry[0] in self.commands:
            local = [self.commands[entry[0]], *entry[1:]]
        else:
            local = entry
        env = _base_env(sim.dir, sim.name)
        spec_env: dict[str, str] = {}
        for src in c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, key in (("secret", "secretRef"), ("configmap", "configMapRef")):
                if key in src:
                    ref = src[key]
                    obj = self._object(kind, ref["name"], bool(ref.get("optional")))
                    for k, v in ({} if obj is None else self._data(kind, obj)).items():
                        spec_env[prefix + k] = v.decode(errors="replace")
        for e in c.get("env") or []:
            value: str | None
            if "valueFrom" in e:
                vf = e["valueFrom"]
                if "secretKeyRef" in vf or "configMapKeyRef" in vf:
                    kind = "secret" if "secretKeyRef" in vf else "configmap"
                    ref = vf.get("secretKeyRef") or vf.get("configMapKeyRef")
                    value = self._key_of(kind, ref["name"], ref["key"], bool(ref.get("optional")))
                elif "fieldRef" in vf:
                    value = _field_ref(pod, vf["fieldRef"]["fieldPath"])
                else:
                    raise PodSimError(f"container {name}: env {e['name']} valueFrom not emulated")
            else:
                value = _expand(str(e.get("value", "")), spec_env)
            if value is not None:
                spec_env[e["name"]] = value
        mounts = self._mounts(c, volumes)
        for k, val in list(spec_env.items()):
            spec_env[k] = self._repath(self._remap(sim, k, val), mounts)
        sidecar = init and c.get("restartPolicy") == "Always"
        kubeconfig = self._service_account_kubeconfig(mounts)
        if kubeconfig is not None:
            spec_env.setdefault("KUBECONFIG", str(kubeconfig))
        if "NATSMESH_LISTEN_PORT" in spec_env:
            spec_env.setdefault("NATSMESH_ADMIN_HOST", "127.0.0.1")
        if not init:
            spec_env.setdefault("HOST", "127.0.0.1")
            if outbound and not {"HTTP_PROXY", "NATSMESH_OUTBOUND"} & set(spec_env):
                spec_env["NATSMESH_OUTBOUND"] = outbound
        env.update(spec_env)

        def rewrite(arg: str) -> str:
            return self._repath(self._remap(sim, "", _expand(arg, spec_env)), mounts)

        return ContainerProc(
            name=name,
            argv=local_argv(local, spec_args, rewrite),
            env=env,
            log_path=sim.dir / f"{name}.log",
            spec=c,
            sidecar=sidecar,
        )

    def _service_account_kubeconfig(self, mounts: Sequence[tuple[str, Path]]) -> Path | None:
        """A kubeconfig for the token mounted at the service account path, if any."""
        local = dict(mounts).get(SERVICE_ACCOUNT_DIR)
        if local is None or not (local / "token").exists():
            return None
        path = local.parent / f"{local.name}.kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "in-cluster",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority": str(local / "ca.crt"),
                    },
                }
            ],
            "users": [{"name": "sa", "user": {"token": (local / "token").read_text().strip()}}],
            "contexts": [
                {
                    "name": "in-cluster",
                    "context": {
                        "cluster": "in-cluster",
                        "user": "sa",
                        "namespace": (local / "namespace").read_text().strip()
                        if (local / "namespace").exists()
                        else self.namespace,
                    },
                }
            ],
            "current-context": "in-cluster",
        }
        path.write_text(json.dumps(config))  # JSON is YAML
        path.chmod(0o600)
        return path

    def _probe_port(self, sim: SimPod, c: ContainerProc, port: Any) -> int:
        if isinstance(port, str) and not port.isdigit():
            for p in c.spec.get("ports") or []:
                if p.get("name") == port:
                    port = p["containerPort"]
                    break
            else:
                raise PodSimError(f"container {c.name}: probe port {port} is not declared")
        return sim.ports.get(int(port), int(port))

    def _get_url(self, sim: SimPod, c: ContainerProc, get: JsonDict) -> str:
        """Where an ``httpGet`` (probe or hook) of container ``c`` goes."""
        return f"http://127.0.0.1:{self._probe_port(sim, c, get['port'])}{get.get('path', '/')}"

    def _probe_once(self, sim: SimPod, c: ContainerProc, probe: JsonDict) -> bool:
        if "httpGet" in probe:
            url = self._get_url(sim, c, probe["httpGet"])
            try:
                with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 -- _get_url: http
                    return bool(200 <= r.status < 400)
            except (OSError, urllib.error.URLError):
                return False
        if "tcpSocket" in probe:
            port = self._probe_port(sim, c, probe["tcpSocket"]["port"])
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False
        return True  # exec and grpc probes are not emulated: the process running is enough

    def _wait_probe(self, sim: SimPod, c: ContainerProc, kind: str, deadline: float) -> None:
        probe = c.spec.get(kind)
        while not sim.stopping:
            if not c.alive():
                raise PodSimError(f"container {c.name} exited before its {kind} passed")
            if not probe or self._probe_once(sim, c, probe):
                return
            if time.monotonic() > deadline:
                raise PodSimError(f"container {c.name}: {kind} did not pass in time")
            time.sleep(0.1)

    def _pre_stop(self, sim: SimPod, c: ContainerProc, deadline: float) -> None:
        """A container's ``httpGet`` preStop hook, as the kubelet runs it before
        the SIGTERM (its headers included); a failed hook is logged and the
        stop goes on. ``exec`` and ``sleep`` hooks are not emulated."""
        get = ((c.spec.get("lifecycle") or {}).get("preStop") or {}).get("httpGet")
        if not get or not c.alive():
            return
        try:
            req = urllib.request.Request(self._get_url(sim, c, get))  # noqa: S310 -- http
            for h in get.get("httpHeaders") or []:
                req.add_header(h["name"], h["value"])
            with urllib.request.urlopen(req, timeout=max(0.1, deadline - time.monotonic())) as r:  # noqa: S310 -- http, built here
                log.info("pod %s container %s: preStop answered %d", sim.name, c.name, r.status)
        except (OSError, urllib.error.URLError, PodSimError) as exc:
            log.warning("pod %s container %s: preStop failed: %s", sim.name, c.name, exc)

    def _stop_pod(self, sim: SimPod) -> None:
        """Apps first, then sidecars in reverse order: each its preStop hook,
        then SIGTERM, then SIGKILL after the grace."""
        if sim.stopping:
            return
        sim.stopping = True
        sim.ready = False
        grace = min(float(sim.spec.get("terminationGracePeriodSeconds", 30)), STOP_GRACE_MAX)
        deadline = time.monotonic() + grace
        for group in (sim.containers, list(reversed(sim.init))):
            for c in group:
                self._pre_stop(sim, c, deadline)
                c.signal(signal.SIGTERM)
            for c in group:
                if not c.wait(deadline - time.monotonic()):
                    log.warning("pod %s container %s killed after the grace", sim.name, c.name)
                    self.killed.append(f"{sim.name}/{c.name}")
                    c.signal(signal.SIGKILL)
                    c.wait(5)
        if sim.thread is not None and sim.thread is not threading.current_thread():
            sim.thread.join(timeout=5)
        for c in sim.all_containers():  # started while we were stopping
            c.signal(signal.SIGKILL)
            c.wait(5)
        with self.lock:
            self.pods.pop(sim.uid, None)

    # -- for tests ------------------------------------------------------------

    def select(self, **labels: str) -> list[SimPod]:
        with self.lock:
            pods = list(self.pods.values())
        return [
            p
            for p in pods
            if not p.stopping and all(p.labels.get(k) == v for k, v in labels.items())
        ]

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            failed = [p for p in self.select() if p.error]
            if failed:
                raise AssertionError(
                    f"waiting for {what}: emulated pod failed\n{self.describe(failed)}"
                )
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.describe()}")

    def wait_ready(self, count: int = 1, timeout: float = 60.0, **labels: str) -> list[SimPod]:
        """``count`` ready emulated pods with these labels."""

        def ready() -> bool:
            return len([p for p in self.select(**labels) if p.ready]) >= count

        self.wait_for(f"{count} ready pod(s) {labels}", ready, timeout)
        return [p for p in self.select(**labels) if p.ready]

    def describe(self, pods: Iterable[SimPod] | None = None) -> str:
        pods = self.select() if pods is None else pods
        parts = [p.describe() for p in pods] or ["(no emulated pods)"]
        if self.errors:
            parts.append("podsim errors: " + "; ".join(self.errors[-3:]))
        return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the pods of a namespace as local processes.")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", "-n", required=True)
    parser.add_argument("--kubectl", default="kubectl")
    parser.add_argument("--workdir", default=".work/podsim")
    parser.add_argument("--selector", "-l", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s podsim %(message)s")
    sim = PodSim(
        [args.kubectl, "--kubeconfig", args.kubeconfig],
        args.namespace,
        Path(args.workdir) / args.namespace,
        selector=args.selector,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with sim:
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
