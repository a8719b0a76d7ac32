"""The benchmarks run as the README says, in their quick mode: they cannot rot unseen.

Each is started as a subprocess exactly as a user would (``python -m bench.<name>
--quick`` from the repository root). Only completion and the printed table
are asserted: no timing, the figures of a tiny run on a shared box mean nothing.
That is also why all of them start at once, at the module's first test, and
each test then waits for its own: on their own they took ~65 s of the tier,
mostly waiting for processes to start and phases to end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.fixtures.cluster import Cluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
#: Every benchmark's quick run, from start to end (all share the two cores).
TIMEOUT = 280


class Benches:
    """The quick runs in flight: their processes and output files."""

    def __init__(self, kubeconfig: Path, workdir: Path) -> None:
        self.procs: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}
        env = dict(os.environ)
        argvs = {
            "bench.sidecar": ["--quick"],
            "bench.grpc": ["--quick"],
            "bench.stream": ["--quick"],
            "bench.websocket": ["--quick"],
            "bench.namespace_scale": ["--quick"],
            # On the tier's shared cluster, so scoped to the benchmark's own namespaces.
            "bench.operator_scale": ["--quick", "--scoped"],
        }
        for name, args in argvs.items():
            out = (workdir / f"{name}.out").open("w+b")
            run_env = dict(env, NATSMESH_KUBECONFIG=str(kubeconfig)) if "operator" in name else env
            proc = subprocess.Popen(
                [sys.executable, "-m", name, *args],
                cwd=REPO,
                env=run_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            self.procs[name] = (proc, out)

    def output(self, name: str) -> str:
        """``name``'s whole output once it has exited 0 (else the test fails with it)."""
        proc, out = self.procs[name]
        try:
            code = proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            code = -9
        out.seek(0)
        text = out.read().decode(errors="replace")
        assert code == 0, f"python -m {name} exited {code}\n{text[-6000:]}"
        return text

    def stop(self) -> None:
        for proc, out in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            out.close()


@pytest.fixture(scope="module")
def benches(crds: Cluster) -> Iterator[Benches]:
    with tempfile.TemporaryDirectory(prefix="natsmesh-bench-quick-") as tmp:
        running = Benches(crds.kubeconfig, Path(tmp))
        try:
            yield running
        finally:
            running.stop()


@pytest.mark.timeout(TIMEOUT + 20)
def test_sidecar_bench_quick(benches: Benches) -> None:
    """Needs only nats-server (from the venv, as the integration tier's)."""
    out = benches.output("bench.sidecar")
    assert "natsmesh sidecar benchmark" in out
    assert "load average" in out
    for path in ("direct", "nats", "sidecars"):
        assert f"{path:<10} sequential" in out
    assert "added latency of the two-sidecar path vs direct" in out
    assert "sidecar path / direct" in out
    # Every path's max run, the aiohttp app's two included, answered every call.
    for path in ("direct", "nats", "sidecars", "aio-direct", "aio-sidecars"):
        assert re.search(rf"\n  {path} +[1-9]\d* req/s .* errors 0 ", out), out
    assert "with an aiohttp app (DESIGN.md's baseline): sidecar path / direct = " in out
    assert "CPU per request per sidecar: A " in out
    assert "sidecar RSS idle" in out


@pytest.mark.timeout(TIMEOUT + 20)
def test_grpc_bench_quick(benches: Benches) -> None:
    """Needs nats-server (the venv's) and grpcio, as tests/integration/grpc."""
    out = benches.output("bench.grpc")
    assert "natsmesh gRPC benchmark, unary 1 KiB" in out
    assert "load average" in out
    for path in ("direct", "sidecars"):
        assert re.search(rf"\n{path} +sequential +[0-9.]+ +[0-9.]+ +[0-9.]+ +\d+\n", out), out
        assert re.search(rf"\n{path} +200/s +[0-9.]+", out), out
        assert re.search(rf"\n  {path} +\d+ calls/s", out), out
    assert "added latency of the two-sidecar path vs direct" in out
    assert "concurrent calls on one channel" in out
    assert "sidecar path / direct" in out
    assert "CPU per call per sidecar: A " in out
    assert "sidecar RSS idle" in out


@pytest.mark.timeout(TIMEOUT + 20)
def test_stream_bench_quick(benches: Benches) -> None:
    """Needs nats-server (the venv's) and curl, as tests/integration/stream."""
    out = benches.output("bench.stream")
    assert "natsmesh streamed bodies, 8 MiB each way" in out
    for path in ("direct", "sidecars"):
        assert re.search(rf"\n{path} +[0-9.]+ +[0-9.]+\n", out), out
    assert "sidecars / direct: upload" in out
    assert "sidecar CPU seconds per GiB" in out
    assert "sidecar RSS idle" in out


@pytest.mark.timeout(TIMEOUT + 20)
def test_websocket_bench_quick(benches: Benches) -> None:
    """Needs nats-server (the venv's), as tests/integration/stream."""
    out = benches.output("bench.websocket")
    assert "natsmesh WebSocket, 100 round trips each" in out
    for size in ("32 B text", "64 KiB binary"):
        for path in ("direct", "sidecars"):
            assert re.search(rf"\n{size} +{path} +[0-9.]+ +[0-9.]+ +[0-9.]+\n", out), out
        assert f"{size:<14} added    p50 " in out
    assert re.search(r"RSS per open idle socket \(50 sockets\): A -?[0-9.]+ KB", out), out


@pytest.mark.timeout(TIMEOUT + 20)
def test_operator_bench_quick(benches: Benches) -> None:
    """On the tier's shared cluster, so scoped to the benchmark's own namespaces."""
    out = benches.output("bench.operator_scale")
    assert "natsmesh operator benchmark" in out
    assert "apply -> Ready, 3 services one at a time" in out
    assert "10 services in 2 namespace(s) created at once" in out
    assert "all Ready in" in out
    assert "operator RSS peak" in out


@pytest.mark.timeout(TIMEOUT + 20)
def test_namespace_scale_bench_quick(benches: Benches) -> None:
    out = benches.output("bench.namespace_scale")
    assert "largest JWT" in out
    assert "30 services in one namespace" in out
    assert "20/20 random calls answered by the right service" in out
