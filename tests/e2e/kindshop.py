"""The shop's pods on a real cluster, reached through ``kubectl port-forward``.

Used by the kind e2e (test_e2e_kind.py) and ``make demo-kind``
(demo_traffic.py): one port-forward per shop pod, to its app port, the
sidecar's outbound port (15001) and its admin port (15020), so the scenarios
in shop.py see the same :class:`ShopEndpoints` as on the emulated pods.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e import shop as scenarios
from tests.fixtures.ports import free_port

logger = logging.getLogger(__name__)

SIDECAR = "natsmesh-sidecar"
OUTBOUND, ADMIN = 15001, 15020


@dataclass
class ForwardedShop:
    endpoints: scenarios.ShopEndpoints
    pods: dict[str, str]
    """Pod name of each workload (a scenarios.WORKLOADS key)."""
    forwards: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def close(self) -> None:
        stop(self.forwards)


def stop(forwards: list[subprocess.Popen[bytes]]) -> None:
    for fwd in forwards:
        fwd.terminate()
        try:
            fwd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            fwd.kill()


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"port-forward on 127.0.0.1:{port} did not come up")


def forward_shop(kubectl: list[str], namespace: str, logs: Path) -> ForwardedShop:
    """Port-forwards to the one running pod of each shop workload.

    ``kubectl`` is the command prefix (binary and ``--kubeconfig``); each
    forward logs to ``logs/<workload>.log``. Fails if a workload has no pod,
    more than one, or one without the injected sidecar.
    """
    pods: dict[str, str] = {}
    ports: dict[str, dict[int, int]] = {}
    forwards: list[subprocess.Popen[bytes]] = []
    try:
        for resource, labels in scenarios.WORKLOADS.items():
            selector = ",".join(f"{k}={v}" for k, v in labels.items())
            out = subprocess.run(
                [*kubectl, "get", "pods", "-n", namespace, "-l", selector, "-o", "json"],
                capture_output=True, text=True, check=True, timeout=60,
            ).stdout  # fmt: skip
            items = json.loads(out)["items"]
            running = [p for p in items if not p["metadata"].get("deletionTimestamp")]
            assert len(running) == 1, f"{resource}: {[p['metadata']['name'] for p in running]}"
            pod = running[0]
            sidecars = [c["name"] for c in pod["spec"].get("initContainers", [])]
            assert SIDECAR in sidecars, f"{resource}: the webhook did not inject the sidecar"
            app_port = int(pod["spec"]["containers"][0]["ports"][0]["containerPort"])
            pods[resource] = pod["metadata"]["name"]
            ports[resource] = {p: free_port() for p in (app_port, OUTBOUND, ADMIN)}
            log = (logs / f"{resource}.log").open("wb")
            forwards.append(
                subprocess.Popen(
                    [
                        *kubectl, "port-forward", "-n", namespace, f"pod/{pods[resource]}",
                        *(f"{local}:{remote}" for remote, local in ports[resource].items()),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
            for local in ports[resource].values():
                wait_port(local)
            logger.info("forwarding %s (%s): %s", resource, pods[resource], ports[resource])
    except BaseException:
        stop(forwards)
        raise

    def url(resource: str, port: int) -> str:
        return f"http://127.0.0.1:{ports[resource][port]}"

    def app_url(resource: str) -> str:
        app_port = next(p for p in ports[resource] if p not in (OUTBOUND, ADMIN))
        return url(resource, app_port)

    endpoints = scenarios.ShopEndpoints(
        namespace=namespace,
        gateway=app_url("gateway"),
        outbound=lambda r: url(r, OUTBOUND),
        admin=lambda r: url(r, ADMIN),
        app=app_url,
    )
    return ForwardedShop(endpoints, pods, forwards)
