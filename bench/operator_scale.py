"""Operator benchmark: apply-to-Ready latency and a 1,000-service reconcile.

Runs the real operator (a subprocess) against the local control plane in
``NATSMESH_KUBECONFIG`` and an operator-mode nats-server, like the
integration tests do:

1. latency: N NatsServices applied one after another; for each, the time
   from the create call returning to ``Ready=True`` in its status (p50/p95);
2. scale: M NatsServices created at once (bounded concurrency); the time
   until all are Ready, and the operator's peak RSS (``VmHWM``).

    hack/with-cluster.sh .venv/bin/python -m bench.operator_scale [--latency 100] [--scale 1000]
    hack/with-cluster.sh .venv/bin/python -m bench.operator_scale --quick --scoped   # CI smoke run

(The module was bench/operator.py once: run as a script, that name shadowed the
standard library's ``operator`` module; tests/unit/foundation checks that no
module of ours shadows one again.)

Targets (DESIGN.md): apply-to-Ready p95 <= 1 s; 1,000 services <= 60 s with
RSS <= 150 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx2
from lightkube import AsyncClient, KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.types import PatchType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from natsmesh_operator.handlers.kube import NatsServiceRes  # noqa: E402
from tests.fixtures.cluster import Cluster  # noqa: E402

MAX_WAIT = 180.0


def service(name: str, namespace: str) -> Any:
    return NatsServiceRes(
        metadata=ObjectMeta(name=name, namespace=namespace),
        spec={"selector": {"matchLabels": {"app": name}}, "port": 8080},
    )


def ready(obj: Any) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def trace_dump(pid: int, prefix: str | None) -> None:
    """Ask an operator started with NATSMESH_TRACEMALLOC for a dump (numbered in order)."""
    if prefix:
        os.kill(pid, signal.SIGUSR1)
        time.sleep(2)  # the dump pauses the operator's loop: not inside a measurement


async def latency(kube: AsyncClient, namespace: str, count: int) -> list[float]:
    out = []
    for i in range(count):
        name = f"lat-{i}"
        await kube.create(service(name, namespace))
        started = time.perf_counter()
        deadline = started + MAX_WAIT
        while time.perf_counter() < deadline:
            obj = await kube.get(NatsServiceRes, name, namespace=namespace)
            if ready(obj.to_dict()):  # type: ignore[no-untyped-call]
                out.append(time.perf_counter() - started)
                break
            await asyncio.sleep(0.01)
        else:
            raise SystemExit(f"{name} not Ready after {MAX_WAIT}s")
    return out


async def scale(kube: AsyncClient, namespaces: list[str], count: int) -> float | None:
    """Seconds until ``count`` services spread over ``namespaces`` are all Ready."""
    started = time.perf_counter()
    sem = asyncio.Semaphore(16)

    async def create(i: int) -> None:
        async with sem:
            await kube.create(service(f"svc-{i}", namespaces[i % len(namespaces)]))

    await asyncio.gather(*(create(i) for i in range(count)))
    deadline = started + MAX_WAIT
    done = 0
    while time.perf_counter() < deadline:
        items = []
        for ns in namespaces:
            items += [o.to_dict() async for o in kube.list(NatsServiceRes, namespace=ns)]  # type: ignore[no-untyped-call]
        done = sum(1 for o in items if ready(o))
        if done == count:
            return time.perf_counter() - started
        await asyncio.sleep(1.0)
    print(f"  only {done} of {count} Ready after {MAX_WAIT:.0f} s")
    return None


async def release(kube: AsyncClient, cluster: Cluster, namespaces: list[str]) -> None:
    """Delete the benchmark's namespaces without leaving them stuck Terminating.

    The operator is about to go (with its NATS server), so its finalizers
    would never be released: drop them, then delete.
    """
    sem = asyncio.Semaphore(16)

    async def strip(name: str, ns: str) -> None:
        async with sem:
            await kube.patch(
                NatsServiceRes,
                name,
                {"metadata": {"finalizers": None}},
                namespace=ns,
                patch_type=PatchType.MERGE,
            )

    for ns in namespaces:
        names = [
            o.metadata.name
            async for o in kube.list(NatsServiceRes, namespace=ns)
            if o.metadata and o.metadata.name
        ]
        await asyncio.gather(*(strip(n, ns) for n in names))
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


#: (what, measured, target) of the printed table.
Row = tuple[str, str, str]


async def run(args: argparse.Namespace, cluster: Cluster, pid: int, scope: str) -> list[Row]:
    kube = AsyncClient(
        config=KubeConfig.from_file(str(cluster.kubeconfig)), timeout=httpx2.Timeout(60)
    )
    rows: list[Row] = [("operator RSS idle", f"{current_rss_mb(pid):.0f} MB", "")]
    trace_dump(pid, args.tracemalloc)
    try:
        if args.latency:
            ns = f"{scope}-lat-{uuid.uuid4().hex[:5]}"
            cluster.kubectl("create", "namespace", ns)
            lat = await latency(kube, ns, args.latency)
            rows.append(
                (
                    f"apply -> Ready, {len(lat)} services one at a time",
                    f"p50 {statistics.median(lat) * 1000:.0f} ms, "
                    f"p95 {pct(lat, 0.95) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms",
                    "p95 <= 1000 ms",
                )
            )
            rows.append((f"operator RSS after the {len(lat)}", f"{current_rss_mb(pid):.0f} MB", ""))
            trace_dump(pid, args.tracemalloc)
            await release(kube, cluster, [ns])
        if args.scale:
            tag = uuid.uuid4().hex[:5]
            namespaces = [f"{scope}-scale-{tag}-{i}" for i in range(args.namespaces)]
            for ns in namespaces:
                cluster.kubectl("create", "namespace", ns)
            took = await scale(kube, namespaces, args.scale)
            rows.append(
                (
                    f"{args.scale} services in {args.namespaces} namespace(s) created at once",
                    f"all Ready in {took:.1f} s" if took is not None else "NOT all Ready",
                    "<= 60 s (1,000)",
                )
            )
            rows.append(("operator RSS peak", f"{peak_rss_mb(pid):.0f} MB", "<= 150 MB"))
            now = f"{current_rss_mb(pid):.0f} MB"
            rows.append((f"operator RSS with the {args.scale} Ready", now, ""))
            trace_dump(pid, args.tracemalloc)
            await release(kube, cluster, namespaces)
    finally:
        await kube.close()
    return rows


def report(rows: list[Row], load_before: float, load_after: float, quick: bool) -> None:
    note = " (--quick: tiny counts, figures not comparable)" if quick else ""
    print(f"\nnatsmesh operator benchmark{note}")
    print(f"load average (1 min) before {load_before:.2f}, after {load_after:.2f}\n")
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    print(f"{'':<{width}}  {'measured':<{value_width}}  target")
    for what, value, target in rows:
        print(f"{what:<{width}}  {value:<{value_width}}  {target}")


def main() -> int:
    global MAX_WAIT
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=int, default=100, help="services for the latency run")
    parser.add_argument("--scale", type=int, default=1000, help="services for the scale run")
    parser.add_argument(
        "--namespaces", type=int, default=20, help="namespaces the scale run spreads them over"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny counts (3 services one by one, 10 at once in 2 namespaces): a smoke run for CI",
    )
    parser.add_argument(
        "--scoped",
        action="store_true",
        help="watch only the benchmark's namespaces (default: the whole cluster, as the chart "
        "does; needs a cluster of its own, which hack/with-cluster.sh starts)",
    )
    parser.add_argument(
        "--tracemalloc",
        metavar="PREFIX",
        help="run the operator with NATSMESH_TRACEMALLOC=PREFIX and take a dump idle, after the "
        "latency run and with the scale run Ready (RSS figures are then inflated by tracing; "
        "set NATSMESH_TRACEMALLOC_INTERVAL too for dumps during the burst)",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=MAX_WAIT,
        help=f"seconds to wait for Ready before giving up (default {MAX_WAIT:g}; a busy box "
        "needs more, and a peak RSS measured before all are Ready is not the whole burst's)",
    )
    args = parser.parse_args()
    MAX_WAIT = args.max_wait
    if args.tracemalloc:
        os.environ["NATSMESH_TRACEMALLOC"] = args.tracemalloc
    if args.quick:
        args.latency, args.scale, args.namespaces = 3, 10, 2
    kubeconfig = os.environ.get("NATSMESH_KUBECONFIG")
    if not kubeconfig:
        print("set NATSMESH_KUBECONFIG (run under hack/with-cluster.sh)", file=sys.stderr)
        return 2
    cluster = Cluster(Path(kubeconfig))
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    from tests.fixtures.operator import start_operator

    with tempfile.TemporaryDirectory() as tmp:
        op = start_operator(
            cluster,
            Path(tmp),
            drift_interval=60,
            endpoints_interval=15,
            cluster_wide=not args.scoped,
        )
        load_before = os.getloadavg()[0]
        try:
            assert op.proc is not None
            rows = asyncio.run(run(args, cluster, op.proc.pid, op.scope))
        finally:
            op.teardown()
    report(rows, load_before, os.getloadavg()[0], args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
