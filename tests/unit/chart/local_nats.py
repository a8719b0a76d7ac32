"""The chart's rendered NATS configuration, made runnable by local nats-servers.

`helm template` gives nats.conf (ConfigMap), routes.conf (the route
credentials Secret) and the route TLS Secret. A pod would mount them under
/etc/nats; here each "pod" gets a directory with the same layout (config/,
routes/, routes-tls/, bootstrap/), so the relative includes of nats.conf work
unchanged. Only what a pod has and this host does not is rewritten: listen
addresses and ports (each server gets free ports), absolute mount paths, and
the pods' DNS names in the route URLs. Every rewrite must match, so a change of
the chart's config shows up here as a failure, not as a silently untested path.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fixtures.nats_server import free_port, nats_server_binary, stop_process

from .render import FULLNAME, NAMESPACE, Manifest, render

NATS = f"{FULLNAME}-nats"
HEADLESS = f"{NATS}-headless"
START_TIMEOUT = 20.0
#: The address a pod's 0.0.0.0 listener is reached on from other pods. Tests
#: may pass another loopback address (127.0.0.2) to tell "the pod's own
#: loopback" from "the pod's IP" on one host.
POD_IP = "127.0.0.1"


@dataclass(frozen=True)
class RenderedNats:
    """What the chart gives a NATS pod, from one `helm template`."""

    conf: str
    routes_conf: str | None
    route_user: str | None
    route_password: str | None
    tls: Mapping[str, bytes] | None
    replicas: int
    statefulset: dict[str, Any]

    def probe_url_paths(self) -> dict[str, str]:
        """Probe name -> the monitoring path (with query) its command fetches."""
        container = self.statefulset["spec"]["template"]["spec"]["containers"][0]
        paths = {}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = " ".join(container[probe]["exec"]["command"])
            match = re.search(r"http://127\.0\.0\.1:\$\{NATS_MONITOR_PORT\}(/[^\"\s]*)", command)
            assert match, f"{probe} does not fetch the loopback monitoring port: {command}"
            paths[probe] = match.group(1)
        return paths


def rendered(values: Mapping[str, Any] | None = None) -> RenderedNats:
    manifest: Manifest = render(values)
    conf: str = manifest.get("ConfigMap", f"{NATS}-config")["data"]["nats.conf"]
    secrets = {s["metadata"]["name"]: s for s in manifest.all("Secret")}
    routes = secrets.get(f"{NATS}-routes")
    tls_secret = secrets.get(f"{NATS}-routes-tls")
    tls = None
    if tls_secret is not None:
        tls = {k: base64.b64decode(v) for k, v in tls_secret["data"].items()}
    sts = manifest.get("StatefulSet", NATS)
    return RenderedNats(
        conf=conf,
        routes_conf=routes["stringData"]["routes.conf"] if routes else None,
        route_user=routes["stringData"]["username"] if routes else None,
        route_password=routes["stringData"]["password"] if routes else None,
        tls=tls,
        replicas=int(sts["spec"]["replicas"]),
        statefulset=sts,
    )


def _sub(pattern: str, replacement: str, text: str, what: str) -> str:
    new, count = re.subn(pattern, lambda _: replacement, text)
    assert count >= 1, f"the rendered config no longer has {what} ({pattern!r})"
    return new


@dataclass
class LocalPod:
    """One NATS "pod": its directory, ports and process."""

    index: int
    dir: Path
    pod_ip: str
    client_port: int = field(default_factory=free_port)
    route_port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    #: Where the monitoring listener is: the pod's loopback, or its IP when exposed.
    monitor_host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"{NATS}-{self.index}"

    @property
    def config(self) -> Path:
        return self.dir / "config" / "nats.conf"

    @property
    def log(self) -> Path:
        return self.dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://{self.pod_ip}:{self.client_port}"

    def monitor(self, path: str, timeout: float = 3) -> Any:
        with urllib.request.urlopen(
            f"http://{self.monitor_host}:{self.monitor_port}{path}", timeout=timeout
        ) as r:
            return json.load(r)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(self.config)],
                stdout=log,
                stderr=log,
                env={**os.environ, "POD_NAME": self.name},
                cwd=self.dir,
            )

    def wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                break
            try:
                self.monitor("/healthz?js-server-only=true", timeout=1)
                return
            except OSError:
                time.sleep(0.05)
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        raise AssertionError(f"{self.name} did not become healthy; log {self.log}:\n{tail}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def materialise(
    nats: RenderedNats,
    workdir: Path,
    resolver_conf: Callable[[Path], str],
    *,
    pod_ip: str = POD_IP,
) -> list[LocalPod]:
    """One directory per pod with the chart's files, rewritten for this host.

    ``resolver_conf(pod_dir)`` returns the pod's bootstrap/resolver.conf (what
    the bootstrap Secret holds, with a resolver directory inside ``pod_dir``).
    With route TLS, each IP route would be verified against "127.0.0.1", which
    no pod certificate names; in a cluster the routes name the pods by DNS. So
    the first pod's route URL is also kept as rendered, in front: nats-server
    then uses that DNS name to verify the routes it dials by IP. It does not
    resolve here; nats-server logs that and keeps retrying.
    """
    pods = [LocalPod(i, workdir / f"{NATS}-{i}", pod_ip) for i in range(nats.replicas)]
    for pod in pods:
        for sub in ("config", "bootstrap", "routes", "routes-tls", "data", "run"):
            (pod.dir / sub).mkdir(parents=True, exist_ok=True)
        conf = nats.conf
        conf = _sub(r"listen: 0\.0\.0\.0:4222", f"listen: {pod_ip}:{pod.client_port}", conf, "4222")
        # The pod's loopback stays loopback; its 0.0.0.0 is reached at pod_ip.
        pod.monitor_host = "127.0.0.1" if "http: 127.0.0.1:8222" in conf else pod_ip
        conf = _sub(
            r"http: (127\.0\.0\.1|0\.0\.0\.0):8222",
            f"http: {pod.monitor_host}:{pod.monitor_port}",
            conf,
            "the monitoring listener",
        )
        conf = _sub(r"/data/", f"{pod.dir}/data/", conf, "/data")
        conf = _sub(r"/var/run/nats", f"{pod.dir}/run", conf, "/var/run/nats")
        if nats.replicas > 1:
            conf = _sub(
                r"listen: 0\.0\.0\.0:6222", f"listen: {pod_ip}:{pod.route_port}", conf, "6222"
            )
        if nats.tls is not None:
            conf = _sub(r"/etc/nats/routes-tls/", f"{pod.dir}/routes-tls/", conf, "route TLS")
            for name, body in nats.tls.items():
                (pod.dir / "routes-tls" / name).write_bytes(body)
        pod.config.write_text(conf)
        (pod.dir / "bootstrap" / "resolver.conf").write_text(resolver_conf(pod.dir))
        if nats.routes_conf is not None:
            (pod.dir / "routes" / "routes.conf").write_text(_local_routes(nats, pods, pod_ip))
    return pods


def _local_routes(nats: RenderedNats, pods: list[LocalPod], pod_ip: str) -> str:
    assert nats.routes_conf is not None
    text = nats.routes_conf
    first = ""
    for pod in pods:
        dns = re.escape(f"@{pod.name}.{HEADLESS}.{NAMESPACE}.svc:6222")
        match = re.search(r'"nats://[^"]*' + dns + '"', text)
        assert match, f"routes.conf has no route to {pod.name}"
        first = first or match.group(0)
        text = _sub(dns, f"@{pod_ip}:{pod.route_port}", text, f"the route to {pod.name}")
    if nats.tls is not None:
        text = text.replace("routes: [", f"routes: [\n  {first}", 1)
    return text


@contextlib.contextmanager
def running(pods: list[LocalPod]) -> Iterator[list[LocalPod]]:
    """Start every pod at once (as the StatefulSet's Parallel policy does)."""
    try:
        for pod in pods:
            pod.start()
        deadline = time.monotonic() + START_TIMEOUT
        for pod in pods:
            pod.wait_healthy(deadline)
        yield pods
    finally:
        for pod in pods:
            pod.stop()
