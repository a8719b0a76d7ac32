"""The benchmarks run as the README says, in their quick mode: they cannot rot unseen.

Each is started as a subprocess exactly as a user would (``python -m bench.<name>
--quick`` from the repository root). Only completion and the printed table
are asserted: no timing, the figures of a tiny run on a shared box mean nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cluster import Cluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]


def run_bench(argv: list[str], env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.timeout(120)
def test_sidecar_bench_quick() -> None:
    """Needs only nats-server (from the venv, as the integration tier's)."""
    out = run_bench(["bench.sidecar", "--quick"], dict(os.environ), timeout=100)
    assert "natsmesh sidecar benchmark" in out
    assert "load average" in out
    for path in ("direct", "nats", "sidecars"):
        assert f"{path:<10} sequential" in out
    assert "added latency of the two-sidecar path vs direct" in out
    assert "sidecar path / direct" in out
    assert "CPU per request per sidecar: A " in out
    assert "sidecar RSS idle" in out


@pytest.mark.timeout(120)
def test_grpc_bench_quick() -> None:
    """Needs nats-server (the venv's) and grpcio, as tests/integration/grpc."""
    out = run_bench(["bench.grpc", "--quick"], dict(os.environ), timeout=100)
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


@pytest.mark.timeout(120)
def test_stream_bench_quick() -> None:
    """Needs nats-server (the venv's) and curl, as tests/integration/stream."""
    out = run_bench(["bench.stream", "--quick"], dict(os.environ), timeout=100)
    assert "natsmesh streamed bodies, 8 MiB each way" in out
    for path in ("direct", "sidecars"):
        assert re.search(rf"\n{path} +[0-9.]+ +[0-9.]+\n", out), out
    assert "sidecars / direct: upload" in out
    assert "sidecar CPU seconds per GiB" in out
    assert "sidecar RSS idle" in out


@pytest.mark.timeout(120)
def test_websocket_bench_quick() -> None:
    """Needs nats-server (the venv's), as tests/integration/stream."""
    out = run_bench(["bench.websocket", "--quick"], dict(os.environ), timeout=100)
    assert "natsmesh WebSocket, 100 round trips each" in out
    for size in ("32 B text", "64 KiB binary"):
        for path in ("direct", "sidecars"):
            assert re.search(rf"\n{size} +{path} +[0-9.]+ +[0-9.]+ +[0-9.]+\n", out), out
        assert f"{size:<14} added    p50 " in out
    assert re.search(r"RSS per open idle socket \(50 sockets\): A -?[0-9.]+ KB", out), out


@pytest.mark.timeout(300)
def test_operator_bench_quick(crds: Cluster) -> None:
    """On the tier's shared cluster, so scoped to the benchmark's own namespaces."""
    env = dict(os.environ, NATSMESH_KUBECONFIG=str(crds.kubeconfig))
    out = run_bench(["bench.operator_scale", "--quick", "--scoped"], env, timeout=280)
    assert "natsmesh operator benchmark" in out
    assert "apply -> Ready, 3 services one at a time" in out
    assert "10 services in 2 namespace(s) created at once" in out
    assert "all Ready in" in out
    assert "operator RSS peak" in out


@pytest.mark.timeout(120)
def test_namespace_scale_bench_quick() -> None:
    out = run_bench(["bench.namespace_scale", "--quick"], dict(os.environ), timeout=100)
    assert "largest JWT" in out
    assert "30 services in one namespace" in out
    assert "20/20 random calls answered by the right service" in out
