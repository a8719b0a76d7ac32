"""Sidecar benchmark: direct HTTP vs raw nats-py request-reply vs two sidecars.

Run from the repository root (under 3 minutes)::

    .venv/bin/python bench/sidecar.py            # full run
    .venv/bin/python bench/sidecar.py --quick    # shorter phases

One process tree on this machine: nats-server, the app, a raw NATS responder,
sidecar B (in front of the app) and sidecar A (the caller's), each its own
process started with ``python -m natsmesh_sidecar`` and NATSMESH_* env. The
load generator (this process, uvloop, raw asyncio + httptools keep-alive
connections) sends 1 KiB bodies at fixed rates (open loop: requests start on
schedule whether or not earlier ones finished) and then as fast as 32
connections go. Latency is measured from send to full response.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sidecar"))

logger = logging.getLogger("bench.sidecar")

BODY = b"x" * 1024
RATES = (100, 500, 1000)
CONNS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(sorted_ms: list[float], p: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, int(p / 100.0 * len(sorted_ms)))]


# -- child roles --------------------------------------------------------------


async def role_app(port: int) -> None:
    from tests.integration.sidecar.sidecar_harness import AppReply, AppRequest, TestApp

    reply = AppReply(200, [("content-type", "application/octet-stream")], BODY)

    def fast(req: AppRequest) -> AppReply:
        return reply

    async def slow(req: AppRequest) -> AppReply:
        return reply

    await TestApp(slow, fast=fast).start(port)
    await asyncio.Event().wait()


async def role_responder(url: str) -> None:
    import nats

    nc = await nats.connect(url)

    async def cb(msg: object) -> None:
        await nc.publish(msg.reply, BODY)  # type: ignore[attr-defined]

    await nc.subscribe("bench.raw", queue="raw", cb=cb)
    await asyncio.Event().wait()


# -- load generation -------------------------------------------------------------


class HttpTarget:
    def __init__(self, port: int, host: str) -> None:
        from tests.integration.sidecar.sidecar_harness import render

        self.port = port
        self.raw = render("POST", "/bench", host=host, body=BODY)
        self.idle: list[object] = []

    async def _client(self) -> object:
        from tests.integration.sidecar.sidecar_harness import Client

        while self.idle:
            c = self.idle.pop()
            t = c.proto.transport  # type: ignore[attr-defined]
            if t is not None and not t.is_closing():
                return c
        return await Client.open(self.port)

    async def call(self) -> int:
        c = await self._client()
        (fut,) = c.send_raw(self.raw)  # type: ignore[attr-defined]
        r = await fut
        self.idle.append(c)
        return int(r.status)

    def close(self) -> None:
        for c in self.idle:
            c.close()  # type: ignore[attr-defined]


class NatsTarget:
    def __init__(self, nc: object) -> None:
        self.nc = nc

    async def call(self) -> int:
        await self.nc.request("bench.raw", BODY, timeout=5)  # type: ignore[attr-defined]
        return 200

    def close(self) -> None:
        pass


Call = Callable[[], Awaitable[int]]


async def fixed_rate(call: Call, rate: int, seconds: float) -> tuple[list[float], int]:
    """Open loop: request i starts at t0 + i/rate; returns latencies (ms) and errors."""
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    errors = 0
    n = int(rate * seconds)
    tasks: list[asyncio.Task[None]] = []

    async def one() -> None:
        nonlocal errors
        t = time.perf_counter()
        try:
            status = await call()
        except Exception:
            errors += 1
            return
        if status != 200:
            errors += 1
            return
        lat.append((time.perf_counter() - t) * 1000.0)

    t0 = loop.time()
    for i in range(n):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one()))
    await asyncio.gather(*tasks)
    lat.sort()
    return lat, errors


async def max_throughput(call: Call, conns: int, seconds: float) -> tuple[float, list[float], int]:
    loop = asyncio.get_running_loop()
    stop = loop.time() + seconds
    count = 0
    errors = 0
    lat: list[float] = []

    async def worker() -> None:
        nonlocal count, errors
        while loop.time() < stop:
            t = time.perf_counter()
            try:
                status = await call()
            except Exception:
                errors += 1
                continue
            if status == 200:
                count += 1
                lat.append((time.perf_counter() - t) * 1000.0)
            else:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    elapsed = time.perf_counter() - t0
    lat.sort()
    return count / elapsed, lat, errors


# -- orchestration -----------------------------------------------------------------


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=None if os.environ.get("BENCH_DEBUG") else subprocess.DEVNULL,
    )


def profile(out: str, pids: dict[str, int], seconds: float) -> list[subprocess.Popen[bytes]]:
    """Attach py-spy (a local dev tool, not a dependency) to each sidecar for ``seconds``."""
    spy = Path(sys.executable).parent / "py-spy"
    Path(out).mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                str(spy),
                "record",
                "-p",
                str(pid),
                "-d",
                str(int(seconds)),
                "-r",
                "250",
                "-f",
                "raw",
                "-o",
                str(Path(out) / f"sidecar-{k}.txt"),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for k, pid in pids.items()
    ]


async def wait_port(port: int, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"port {port} not listening")


async def wait_ready(admin_port: int, within: float = 15.0) -> None:
    from tests.integration.sidecar.sidecar_harness import request

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if (await request(admin_port, "GET", "/readyz")).status == 200:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError("sidecar not ready")


async def main(args: argparse.Namespace) -> int:
    import nats

    from natsmesh_sidecar import subjects
    from tests.integration.sidecar.sidecar_harness import destination, table

    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="natsmesh-bench-"))
    py = sys.executable
    nats_port, app_port = free_port(), free_port()
    a_out, a_admin, b_out, b_admin = free_port(), free_port(), free_port(), free_port()
    url = f"nats://127.0.0.1:{nats_port}"
    results: dict[str, object] = {"cpus": os.cpu_count()}
    try:
        procs.append(
            start([str(Path(py).parent / "nats-server"), "-a", "127.0.0.1", "-p", str(nats_port)])
        )
        await wait_port(nats_port)
        procs.append(start([py, __file__, "--role", "app", "--port", str(app_port)]))
        procs.append(start([py, __file__, "--role", "responder", "--url", url]))
        (tmp / "b.json").write_bytes(table("bench", "app").to_json())
        (tmp / "a.json").write_bytes(
            table("bench", "client", destinations=[destination("bench", "app")]).to_json()
        )
        base = {
            **os.environ,
            "NATSMESH_NAMESPACE": "bench",
            "NATSMESH_NATS_URL": url,
            "NATSMESH_ADMIN_HOST": "127.0.0.1",
        }
        if not args.access_log:
            base["NATSMESH_ACCESS_LOG"] = "0"
        sidecar_b = start(
            [py, "-m", "natsmesh_sidecar"],
            {
                **base,
                "NATSMESH_SERVICE": "app",
                "NATSMESH_APP_PORT": str(app_port),
                "NATSMESH_LISTEN_PORT": str(b_out),
                "NATSMESH_ADMIN_PORT": str(b_admin),
                "NATSMESH_TABLE_FILE": str(tmp / "b.json"),
            },
        )
        sidecar_a = start(
            [py, "-m", "natsmesh_sidecar"],
            {
                **base,
                "NATSMESH_SERVICE": "client",
                "NATSMESH_LISTEN_PORT": str(a_out),
                "NATSMESH_ADMIN_PORT": str(a_admin),
                "NATSMESH_TABLE_FILE": str(tmp / "a.json"),
            },
        )
        procs += [sidecar_a, sidecar_b]
        await wait_port(app_port)
        await wait_ready(a_admin)
        await wait_ready(b_admin)
        await asyncio.sleep(0.5)
        results["rss_idle_mb"] = {"A": rss_mb(sidecar_a.pid), "B": rss_mb(sidecar_b.pid)}

        nc = await nats.connect(url)
        targets: dict[str, object] = {
            "direct": HttpTarget(app_port, "app"),
            "nats": NatsTarget(nc),
            "sidecars": HttpTarget(a_out, subjects.host_of("bench", "app")),
        }
        phase = 1.0 if args.quick else 3.0
        # Warm up every path (connections, JIT-less caches, pools).
        for t in targets.values():
            await fixed_rate(t.call, 200, 0.5)  # type: ignore[attr-defined]

        rows: dict[str, dict[str, object]] = {}
        for name, t in targets.items():
            lat, err = [], 0
            for _ in range(100 if args.quick else 200):
                s = time.perf_counter()
                await t.call()  # type: ignore[attr-defined]
                lat.append((time.perf_counter() - s) * 1000.0)
            lat.sort()
            rows.setdefault(name, {})["sequential"] = {
                "p50": pct(lat, 50),
                "p90": pct(lat, 90),
                "p99": pct(lat, 99),
            }
            for rate in RATES:
                lat, err = await fixed_rate(t.call, rate, phase)  # type: ignore[attr-defined]
                rows[name][f"{rate}/s"] = {
                    "p50": pct(lat, 50),
                    "p90": pct(lat, 90),
                    "p99": pct(lat, 99),
                    "errors": err,
                }

        peak = {"A": 0.0, "B": 0.0}
        for name, t in targets.items():
            cpu0 = (cpu_seconds(sidecar_a.pid), cpu_seconds(sidecar_b.pid))
            who = {
                "nats-server": procs[0].pid,
                "app": procs[1].pid,
                "responder": procs[2].pid,
                "load generator": os.getpid(),
            }
            box0 = {k: cpu_seconds(pid) for k, pid in who.items()}
            t_box = time.perf_counter()
            sampler_stop = asyncio.Event()

            async def sample(stop: asyncio.Event) -> None:
                while not stop.is_set():
                    peak["A"] = max(peak["A"], rss_mb(sidecar_a.pid))
                    peak["B"] = max(peak["B"], rss_mb(sidecar_b.pid))
                    await asyncio.sleep(0.2)

            sampler = asyncio.create_task(sample(sampler_stop))
            spies = []
            if args.profile and name == "sidecars":
                spies = profile(args.profile, {"A": sidecar_a.pid, "B": sidecar_b.pid}, phase + 1)
            rps, lat, err = await max_throughput(t.call, CONNS, phase + 2)  # type: ignore[attr-defined]
            sampler_stop.set()
            await sampler
            for spy in spies:
                spy.wait(30)
            cpu1 = (cpu_seconds(sidecar_a.pid), cpu_seconds(sidecar_b.pid))
            box_s = time.perf_counter() - t_box
            box = {k: (cpu_seconds(pid) - box0[k]) / box_s for k, pid in who.items()}
            rows[name]["max"] = {
                "rps": rps,
                "p50": pct(lat, 50),
                "p99": pct(lat, 99),
                "errors": err,
            }
            if name == "sidecars":
                dur = phase + 2
                rows[name]["max"]["other_cpu"] = box  # type: ignore[index]
                rows[name]["max"]["sidecar_cpu"] = {  # type: ignore[index]
                    "A": (cpu1[0] - cpu0[0]) / dur,
                    "B": (cpu1[1] - cpu0[1]) / dur,
                }
        results["rss_loaded_mb"] = peak
        results["paths"] = rows
        for t in targets.values():
            t.close()  # type: ignore[attr-defined]
        await nc.close()
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    report(results)
    if args.json:
        write_json(args.json, results)
    return 0


def write_json(path: str, results: dict[str, object]) -> None:
    Path(path).write_text(json.dumps(results, indent=2))


def report(r: dict[str, object]) -> None:
    paths: dict[str, dict[str, dict[str, float]]] = r["paths"]  # type: ignore[assignment]
    direct = paths["direct"]
    print(f"\nnatsmesh sidecar benchmark ({r['cpus']} CPUs, 1 KiB bodies, one box)\n")
    print(f"{'path':<10} {'load':<11} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, rows in paths.items():
        for load, v in rows.items():
            if load == "max":
                continue
            err = int(v.get("errors", 0))
            print(f"{name:<10} {load:<11} {v['p50']:8.3f} {v['p90']:8.3f} {v['p99']:8.3f} {err:7d}")
    print("\nadded latency of the two-sidecar path vs direct (ms):")
    for load in paths["sidecars"]:
        if load == "max":
            continue
        s, d = paths["sidecars"][load], direct[load]
        added = [s[p] - d[p] for p in ("p50", "p90", "p99")]
        print(f"  {load:<11} p50 +{added[0]:.3f}  p90 +{added[1]:.3f}  p99 +{added[2]:.3f}")
    print(f"\nmax throughput at {CONNS} connections:")
    for name, rows in paths.items():
        m = rows["max"]
        print(
            f"  {name:<10} {m['rps']:9.0f} req/s  p50 {m['p50']:.2f} ms  "
            f"p99 {m['p99']:.2f} ms  errors {int(m['errors'])}"
        )
    ratio = paths["sidecars"]["max"]["rps"] / direct["max"]["rps"]
    print(f"  sidecar path / direct = {ratio:.3f}x")
    cpu = paths["sidecars"]["max"].get("sidecar_cpu")
    if isinstance(cpu, dict):
        rps = paths["sidecars"]["max"]["rps"]
        for k in ("A", "B"):
            if cpu[k] > 0:
                per_core = rps / cpu[k]
                print(f"  sidecar {k}: {cpu[k]:.2f} cores busy -> {per_core:.0f} req/s per core")
    other = paths["sidecars"]["max"].get("other_cpu")
    if isinstance(other, dict) and isinstance(cpu, dict):
        parts = ", ".join(f"{k} {v:.2f}" for k, v in other.items())
        total = sum(other.values()) + cpu["A"] + cpu["B"]
        print(
            f"  cores busy during that run: {parts}; with the sidecars {total:.2f} of {r['cpus']}"
        )
    idle: dict[str, float] = r["rss_idle_mb"]  # type: ignore[assignment]
    loaded: dict[str, float] = r["rss_loaded_mb"]  # type: ignore[assignment]
    print(
        f"\nsidecar RSS idle: A {idle['A']:.1f} MB, B {idle['B']:.1f} MB; "
        f"loaded (peak): A {loaded['A']:.1f} MB, B {loaded['B']:.1f} MB"
    )


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["bench", "app", "responder"], default="bench")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--url", default="")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--access-log", action="store_true", help="keep the sidecars' access log on (to /dev/null)"
    )
    parser.add_argument("--json", help="also write the figures as JSON here")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy (pip install py-spy) the sidecars during the max-throughput run; "
        "raw collapsed stacks go to DIR/sidecar-{A,B}.txt",
    )
    args = parser.parse_args()
    import uvloop

    if args.role == "app":
        uvloop.run(role_app(args.port))
        return 0
    if args.role == "responder":
        uvloop.run(role_responder(args.url))
        return 0
    return int(uvloop.run(main(args)))


if __name__ == "__main__":
    sys.exit(cli())
