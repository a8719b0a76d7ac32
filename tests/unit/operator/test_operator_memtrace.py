"""The opt-in tracemalloc switch: off by default, clear errors, real dumps on SIGUSR1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from natsmesh_operator import memtrace


def test_off_unless_asked() -> None:
    assert memtrace.start_from_env({}) is None
    assert memtrace.start_from_env({memtrace.ENV_PATH: "  "}) is None


def test_a_missing_directory_is_an_error_at_start(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not exist"):
        memtrace.start_from_env({memtrace.ENV_PATH: str(tmp_path / "nope" / "op")})


def test_a_bad_interval_is_an_error_at_start(tmp_path: Path) -> None:
    env = {memtrace.ENV_PATH: str(tmp_path / "op"), memtrace.ENV_INTERVAL: "soon"}
    with pytest.raises(SystemExit, match=memtrace.ENV_INTERVAL):
        memtrace.start_from_env(env)


# A process that holds a recognisable allocation, dumps on SIGUSR1, then
# grows it: the second dump must name the growing line and its growth.
CHILD = textwrap.dedent(
    """
    import os, sys, time
    from natsmesh_operator import memtrace
    memtrace.start_from_env()
    held = [bytearray(1024) for _ in range(2000)]
    print("ready", flush=True)
    while not os.path.exists(sys.argv[1]):  # (the operator waits in its loop, not a read)
        time.sleep(0.05)
    held += [bytearray(1024) for _ in range(4000)]  # the growth
    print("grown", flush=True)
    for _ in range(1200):  # the operator's main thread wakes often too
        time.sleep(0.05)
    """
)


def _wait_for(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            time.sleep(0.2)  # written in one call; let it finish
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written")


def test_sigusr1_dumps_snapshots_and_the_growth_between_them(tmp_path: Path) -> None:
    env = dict(os.environ, **{memtrace.ENV_PATH: str(tmp_path / "op")})
    script = tmp_path / "child.py"  # a file, so tracebacks show its lines
    script.write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "go")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGUSR1)
        first = _wait_for(tmp_path / "op.1.txt")
        assert (tmp_path / "op.1.snap").exists()
        assert first.startswith("# dump 1 (SIGUSR1): RSS ")
        assert "held = [bytearray(1024)" in first  # the holder, by line
        (tmp_path / "go").touch()
        assert child.stdout.readline().strip() == "grown"
        child.send_signal(signal.SIGUSR1)
        second = _wait_for(tmp_path / "op.2.txt")
    finally:
        child.kill()
        child.wait()
    growth = second.split("## growth since the previous dump")[1]
    # The growing line leads the growth and carries its ~4 MiB.
    lead = growth.split("\n")[1:4]
    assert "(+4" in lead[0], lead
    assert "KiB" in lead[0], lead
    assert 'child.py", line 9' in lead[1], lead
    assert "# the growth" in lead[2], lead
    # Offline diff of the two raw snapshots says the same.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "natsmesh_operator.memtrace",
            str(tmp_path / "op.1.snap"),
            str(tmp_path / "op.2.snap"),
            "--by",
            "lineno",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    diff = out.split("\n")
    assert "(+4" in diff[0], out[:500]
    assert "# the growth" in diff[2], out[:500]
