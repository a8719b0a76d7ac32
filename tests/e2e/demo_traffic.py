"""Traffic for `hack/demo.sh`: run the shop's pods as local processes and show the mesh at work.

    python tests/e2e/demo_traffic.py --namespace shop   (KUBECONFIG and kubectl on PATH)

Uses the same pod emulator and scenario helpers as the e2e tests, but prints
what happens instead of asserting it.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.e2e import shop as scenarios  # noqa: E402
from tests.e2e.podsim import PodSim  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--namespace", "-n", default="shop")
    parser.add_argument("--workdir", default=str(REPO / ".work" / "demo-run" / "pods"))
    args = parser.parse_args()
    kubectl = shutil.which("kubectl") or "kubectl"
    sim = PodSim(
        [kubectl, "--kubeconfig", os.environ["KUBECONFIG"]], args.namespace, Path(args.workdir)
    )
    sim.start()
    try:
        pods = {
            name: sim.wait_ready(1, timeout=90, **labels)[0]
            for name, labels in scenarios.WORKLOADS.items()
        }
        shop = scenarios.ShopEndpoints(
            namespace=args.namespace,
            gateway=pods["gateway"].url(8080),
            outbound=lambda w: pods[w].url(15001),
            admin=lambda w: pods[w].url(15020),
            app=lambda w: pods[w].url(
                int(pods[w].container("app").spec["ports"][0]["containerPort"])
            ),
        )
        print(f"  {len(pods)} pods running as local processes: app + injected sidecar each")
        scenarios.warm_up(shop)

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
        print(
            f"\n  canary, 200 calls to orders through the gateway: {dict(versions)} (route: 90/10)"
        )

        time.sleep(1.0)
        events = scenarios.deliveries(shop, "inventory")
        print(f"\n  order.created at inventory (FAIL_FIRST=1, so one redelivery): {events}")

        print(f"\n  sidecar metrics: {shop.admin('gateway')}/metrics")
        text = scenarios.http_text(shop.admin("gateway") + "/metrics")
        for line in text.splitlines():
            if line.startswith("natsmesh_sidecar_requests_total"):
                print(f"    {line}")
    finally:
        sim.stop()
    print(
        "\n  (the emulated pods are stopped again; the cluster, NATS and the operator keep running)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
