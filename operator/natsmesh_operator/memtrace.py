"""Opt-in allocation tracing: where the operator's Python memory is, on demand.

``NATSMESH_TRACEMALLOC=<path prefix>`` starts :mod:`tracemalloc` once the
operator's modules are imported (traced, the imports took 35x the CPU).
Then ``kill -USR1 <pid>`` (and, with
``NATSMESH_TRACEMALLOC_INTERVAL=<seconds>``, every that many seconds) writes

* ``<prefix>.<n>.snap``: the raw snapshot (``tracemalloc.Snapshot.load``),
  for diffing any two offline (``python -m natsmesh_operator.memtrace A B``);
* ``<prefix>.<n>.txt``: the process's RSS, the traced total, the largest
  allocation sites by traceback, and the growth since the previous dump.

Tracing costs CPU and memory (every live block keeps its traceback), so it
is off unless asked for and the RSS it reports is inflated by it: use it to
see *what* holds memory, and measure RSS with it off.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

logger = logging.getLogger(__name__)

ENV_PATH = "NATSMESH_TRACEMALLOC"
ENV_INTERVAL = "NATSMESH_TRACEMALLOC_INTERVAL"
ENV_FRAMES = "NATSMESH_TRACEMALLOC_FRAMES"
DEFAULT_FRAMES = 12
TOP = 40
"""Allocation sites listed per dump."""

#: Allocations of tracemalloc itself (modules' code stays: it is memory too).
_NOISE = (tracemalloc.Filter(False, tracemalloc.__file__),)


def rss_mb() -> float:
    """Resident set size of this process (``VmRSS``), or NaN off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _format(stats: list[tracemalloc.StatisticDiff] | list[tracemalloc.Statistic]) -> list[str]:
    lines = []
    sources: dict[str, list[str]] = {}
    for stat in stats[:TOP]:
        size = stat.size / 1024
        head = f"{size:10.1f} KiB in {stat.count} blocks"
        if isinstance(stat, tracemalloc.StatisticDiff):
            head += f" ({stat.size_diff / 1024:+.1f} KiB, {stat.count_diff:+d} blocks)"
        lines.append(head)
        lines += _frames(stat.traceback, sources)
    return lines


def _frames(traceback: tracemalloc.Traceback, sources: dict[str, list[str]]) -> list[str]:
    """Most recent call first, with the source line where the file is readable.

    Not ``Traceback.format()``: its linecache (tokenize, codec lookups) hung
    in the dumping thread while the main thread sat in a blocking read.
    """
    out = []
    for frame in reversed(traceback):
        out.append(f'      File "{frame.filename}", line {frame.lineno}')
        if frame.filename not in sources:
            try:
                with open(frame.filename, encoding="utf-8", errors="replace") as f:
                    sources[frame.filename] = f.read().splitlines()
            except OSError:
                sources[frame.filename] = []
        lines = sources[frame.filename]
        if 0 < frame.lineno <= len(lines) and lines[frame.lineno - 1].strip():
            out.append(f"        {lines[frame.lineno - 1].strip()}")
    return out


def report(snapshot: tracemalloc.Snapshot, previous: tracemalloc.Snapshot | None) -> str:
    """A readable summary of ``snapshot``, and its growth since ``previous``."""
    snapshot = snapshot.filter_traces(_NOISE)
    traced = sum(t.size for t in snapshot.traces) / 2**20
    lines = [f"traced {traced:.1f} MB", ""]
    lines.append("## by file and line")
    lines += _format(snapshot.statistics("lineno"))
    lines.append("")
    lines.append("## by traceback")
    lines += _format(snapshot.statistics("traceback"))
    if previous is not None:
        lines.append("")
        lines.append("## growth since the previous dump, by traceback")
        lines += _format(snapshot.compare_to(previous.filter_traces(_NOISE), "traceback"))
    return "\n".join(lines) + "\n"


class Tracer:
    """Dumps snapshots under a path prefix, from its own thread.

    A signal only wakes the thread: a handler doing the dump would run again,
    nested, for a second signal. The readable report is written by a child
    process from the saved snapshots: computed in here it took seconds of
    the GIL (every allocation it makes is traced too), stalling the operator.
    """

    def __init__(self, prefix: Path, interval: float = 0) -> None:
        self.prefix = prefix
        self.interval = interval
        self._count = 0
        self._wanted = threading.Event()

    def dump(self, why: str) -> str:
        self._count += 1
        base = f"{self.prefix}.{self._count}"
        snapshot = tracemalloc.take_snapshot()
        header = f"# dump {self._count} ({why}): RSS {rss_mb():.1f} MB, "
        snapshot.dump(f"{base}.snap")
        del snapshot
        snaps = [f"{base}.snap"]
        if self._count > 1:
            snaps.insert(0, f"{self.prefix}.{self._count - 1}.snap")
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PATH)}
        with open(f"{base}.txt.part", "w") as out:
            out.write(header)
            out.flush()
            # This thread waits without the GIL; the operator runs on.
            subprocess.run(
                [sys.executable, "-m", __name__, "--report", *snaps],
                stdout=out,
                env=env,
                check=True,
            )
        os.replace(f"{base}.txt.part", f"{base}.txt")  # whole or not there
        logger.info("tracemalloc dump %s.{snap,txt} written (%s)", base, why)
        return base

    def request(self, _signum: int = 0, _frame: FrameType | None = None) -> None:
        """Ask for a dump (the SIGUSR1 handler)."""
        self._wanted.set()

    def run(self) -> None:
        # A process signal goes to any thread that does not block it, and the
        # handler then waits for the main thread's next bytecode: keep it off
        # this one, which sleeps in wait() for minutes.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        while True:
            asked = self._wanted.wait(self.interval or None)
            self._wanted.clear()
            try:
                self.dump("SIGUSR1" if asked else f"every {self.interval:g} s")
            except Exception:  # a full disk must not end the dumps for good
                logger.exception("tracemalloc dump failed")


def start_from_env(env: Mapping[str, str] = os.environ) -> Tracer | None:
    """Start tracing if ``NATSMESH_TRACEMALLOC`` is set; None otherwise.

    A bad value is an error at start-up, not a silently missing dump.
    """
    raw = env.get(ENV_PATH, "").strip()
    if not raw:
        return None
    prefix = Path(raw)
    if not prefix.parent.is_dir():
        raise SystemExit(f"{ENV_PATH}={raw}: directory {prefix.parent} does not exist")
    try:
        frames = int(env.get(ENV_FRAMES, "") or DEFAULT_FRAMES)
        interval = float(env.get(ENV_INTERVAL, "") or 0)
    except ValueError as exc:
        raise SystemExit(f"{ENV_FRAMES} / {ENV_INTERVAL}: {exc}") from None
    if frames < 1 or interval < 0:
        raise SystemExit(f"{ENV_FRAMES} must be >= 1 and {ENV_INTERVAL} >= 0")
    tracemalloc.start(frames)
    tracer = Tracer(prefix, interval)
    signal.signal(signal.SIGUSR1, tracer.request)
    threading.Thread(target=tracer.run, name="natsmesh-tracemalloc", daemon=True).start()
    logger.warning(
        "tracemalloc on (%d frames): dumps to %s.<n>.{snap,txt} on SIGUSR1%s",
        frames,
        prefix,
        f" and every {interval:g} s" if interval else "",
    )
    return tracer


def main(argv: list[str] | None = None) -> int:
    """Diff two dumps offline (what grew from OLD to NEW), or --report one."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("snaps", nargs="+", type=Path, help="OLD NEW, or with --report [OLD] NEW")
    parser.add_argument("--by", choices=["lineno", "filename", "traceback"], default="traceback")
    parser.add_argument(
        "--report", action="store_true", help="the full report of the last snapshot"
    )
    args = parser.parse_args(argv)
    if len(args.snaps) > 2 or (not args.report and len(args.snaps) != 2):
        parser.error("give OLD NEW (or --report [OLD] NEW)")
    loaded = [tracemalloc.Snapshot.load(str(p)) for p in args.snaps]
    if args.report:
        sys.stdout.write(report(loaded[-1], loaded[0] if len(loaded) == 2 else None))
        return 0
    old, new = (s.filter_traces(_NOISE) for s in loaded)
    print("\n".join(_format(new.compare_to(old, args.by))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
