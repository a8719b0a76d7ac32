"""``natsmesh tap`` as a shell sees it: its arguments, and a pipe that closes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from natsmesh_operator.usercli import tap

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "args",
    [
        # 0 meant "no limit" (run forever), a negative one ended at once
        ["orders", "--duration", "0"],
        ["orders", "--duration", "-5"],
        ["orders", "--duration", "nan"],
        # 0 showed one request
        ["orders", "--max", "0"],
        ["orders", "--max", "-1"],
    ],
)
def test_limits_that_are_not_positive_are_usage_errors(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        tap.main(args)
    assert exited.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_a_reader_that_goes_away_stops_the_tap_quietly() -> None:
    # `natsmesh tap orders | head -1`: the pipe closes under the CLI. Before,
    # BrokenPipeError left as "cannot reach <API server>: [Errno 32] Broken
    # pipe" and the interpreter's last flush failed again (exit 120).
    script = """
import asyncio, json, sys
from natsmesh_operator.usercli import tap, tapview
record = tapview.parse(json.dumps({
    "kind": "request", "ts": 1.0, "instance": "i", "direction": "inbound",
    "method": "GET", "path": "/", "status": 200, "latencyMs": 1.0,
    "source": "a.shop", "destination": "b.shop", "requestId": "r",
}).encode())
stop = asyncio.Event()
emit = tap._emitter("text", stop)
for _ in range(100_000):
    emit(record)
    if stop.is_set():
        break
print("stopped" if stop.is_set() else "never stopped", file=sys.stderr)
"""
    # What `| head -n 1` does: read a line, close the pipe.
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        assert proc.stdout.readline().endswith("rid=r  sidecar=i\n")
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert err == "stopped\n", err
