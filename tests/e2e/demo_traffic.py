"""Traffic for `hack/demo.sh`: show the mesh at work on the emulated shop pods.

    python tests/e2e/demo_traffic.py --pods .work/demo-run/pods/pods.json wait natsmesh-system
    python tests/e2e/demo_traffic.py --pods .work/demo-run/pods/pods.json traffic shop
    python tests/e2e/demo_traffic.py --pods .work/demo-run/pods/pods.json \
        --emulator-pid PID --emulator-log LOG guard -- helm install ...
    python tests/e2e/demo_traffic.py kind-traffic shop   # make demo-kind: real pods

The pods run in the demo's emulator (``python -m tests.e2e.local``), which
writes where each one listens to ``pods.json``. ``wait`` blocks until the
chart's NATS server and operator replicas pass their probes; ``traffic`` uses
the same scenario helpers as the e2e tests, but prints what happens instead of
asserting it; ``kind-traffic`` does the same on a real cluster (kind) through
``kubectl port-forward``s (tests/e2e/kindshop.py). ``guard`` runs a command
(``helm install``, ``kubectl wait``) and stops it as soon as an emulated pod
cannot start or the emulator is gone, with the pod's error and log tail on
screen: such a pod never becomes Ready, and helm would otherwise wait out its
whole timeout in silence.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.e2e import kindshop  # noqa: E402
from tests.e2e import shop as scenarios  # noqa: E402

Pod = dict[str, Any]


#: How often the registry (rewritten by the emulator every second) is read.
POLL = 0.3


class DemoFailed(SystemExit):
    """The demo cannot go on; the message says why (exit status 1)."""


def failed_pods(registry: Path) -> list[Pod]:
    """Emulated pods, in any namespace, that could not start."""
    try:
        found: dict[str, list[Pod]] = json.loads(registry.read_text())
    except (OSError, ValueError):
        return []
    return [p for pods in found.values() for p in pods if p.get("error")]


def failure(registry: Path, emulator_pid: int = 0, emulator_log: str = "") -> str:
    """Why the demo cannot go on ("" while it can): a pod that failed, or no emulator."""
    bad = failed_pods(registry)
    if bad:
        parts = [f"demo: pod {p['name']} cannot start: {p['error']}" for p in bad]
        parts += [p.get("describe", "") for p in bad]
        return "\n".join(parts)
    if emulator_pid and not _alive(emulator_pid):
        tail = ""
        if emulator_log:
            try:
                tail = Path(emulator_log).read_text(errors="replace")[-2000:]
            except OSError:
                tail = ""
        return f"demo: the pod emulator (pid {emulator_pid}) is not running\n{tail}"
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child is not running either.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def guard(
    argv: list[str],
    registry: Path,
    emulator_pid: int = 0,
    emulator_log: str = "",
    grace: float = 5.0,
) -> int:
    """Run ``argv``; stop it and fail as soon as :func:`failure` has something to say."""
    proc = subprocess.Popen(argv)
    try:
        while proc.poll() is None:
            why = failure(registry, emulator_pid, emulator_log)
            if why:
                proc.terminate()
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise DemoFailed(why)
            time.sleep(POLL)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def ready_pods(registry: Path, namespace: str, **labels: str) -> list[Pod]:
    try:
        pods: list[Pod] = json.loads(registry.read_text()).get(namespace, [])
    except (OSError, ValueError):
        return []
    return [
        p for p in pods if p["ready"] and all(p["labels"].get(k) == v for k, v in labels.items())
    ]


def wait_pods(
    registry: Path, namespace: str, count: int, timeout: float, **labels: str
) -> list[Pod]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ready_pods(registry, namespace, **labels)
        if len(found) >= count:
            return found
        why = failure(registry)
        if why:
            raise DemoFailed(why)
        time.sleep(POLL)
    raise SystemExit(
        f"demo: {count} ready pod(s) {labels} in {namespace} did not come up in {timeout:.0f}s; "
        f"see the emulator's log and {registry.parent}/{namespace}/*/*.log"
    )


def url(pod: Pod, port: int) -> str:
    return f"http://127.0.0.1:{pod['ports'][str(port)]}"


def wait_system(registry: Path, namespace: str) -> None:
    for component, count in (("nats", 1), ("operator", 2)):
        pods = wait_pods(
            registry, namespace, count, 90, **{"app.kubernetes.io/component": component}
        )
        print(f"  {component}: {', '.join(p['name'] for p in pods)} running and ready")


def traffic(registry: Path, namespace: str) -> None:
    pods = {
        name: wait_pods(registry, namespace, 1, 90, **labels)[0]
        for name, labels in scenarios.WORKLOADS.items()
    }
    shop = scenarios.ShopEndpoints(
        namespace=namespace,
        gateway=url(pods["gateway"], 8080),
        outbound=lambda w: url(pods[w], 15001),
        admin=lambda w: url(pods[w], 15020),
        app=lambda w: url(pods[w], pods[w]["containers"]["app"][0]),
    )
    print(f"  {len(pods)} pods running as local processes: app + injected sidecar each")
    show(shop)


def kind_traffic(namespace: str) -> None:
    """The same, on real pods: port-forwards with kubectl (KUBECONFIG, PATH)."""
    logs = Path(tempfile.mkdtemp(prefix="natsmesh-demo-forward-"))
    forwarded = kindshop.forward_shop(["kubectl"], namespace, logs)
    try:
        print(f"  {len(forwarded.pods)} pods on kind's kubelets: app + injected sidecar each")
        show(forwarded.endpoints, timeout=60)
    finally:
        forwarded.close()


def show(shop: scenarios.ShopEndpoints, timeout: float = 30.0) -> None:
    """Calls through the mesh, printed: a checkout, a refusal, the canary, events, metrics."""
    scenarios.warm_up(shop, timeout=timeout)

    status, _, body = scenarios.http("POST", shop.gateway + "/checkout", {"item": "book"})
    print(f"\n  POST gateway /checkout -> {status}: gateway -> orders -> payments via NATS")
    print(f"    {body}")

    status, _, body = scenarios.http(
        "POST", shop.outbound("payments") + "/charge", {}, headers={"host": "gateway"}
    )
    print(f"\n  payments calling gateway (not in its allowedCallers) -> {status}")
    print(f"    {body}")

    results = scenarios.many(shop.gateway, "GET", "/orders-version", 200, 16)
    versions = collections.Counter(r[2].get("orders_version") for r in results)
    print(f"\n  canary, 200 calls to orders through the gateway: {dict(versions)} (route: 90/10)")

    time.sleep(1.0)
    events = scenarios.deliveries(shop, "inventory")
    print(f"\n  order.created at inventory (FAIL_FIRST=1, so one redelivery): {events}")

    print(f"\n  sidecar metrics: {shop.admin('gateway')}/metrics")
    text = scenarios.http_text(shop.admin("gateway") + "/metrics")
    for line in text.splitlines():
        if line.startswith("natsmesh_sidecar_requests_total"):
            print(f"    {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pods", default="", help="the emulator's pods.json")
    parser.add_argument("--emulator-pid", type=int, default=0, help="guard: fail if it dies")
    parser.add_argument("--emulator-log", default="", help="guard: shown if the emulator died")
    parser.add_argument("action", choices=["wait", "traffic", "kind-traffic", "guard"])
    parser.add_argument("rest", nargs="+", help="the namespace; for guard: -- COMMAND...")
    args = parser.parse_args()
    registry = Path(args.pods)
    if args.action != "kind-traffic" and not args.pods:
        parser.error(f"{args.action} needs --pods (the emulator's pods.json)")
    if args.action == "guard":
        return guard(args.rest, registry, args.emulator_pid, args.emulator_log)
    if len(args.rest) != 1:
        parser.error(f"{args.action} takes one namespace")
    args.namespace = args.rest[0]
    if args.action == "wait":
        wait_system(registry, args.namespace)
    elif args.action == "kind-traffic":
        kind_traffic(args.namespace)
    else:
        traffic(registry, args.namespace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
