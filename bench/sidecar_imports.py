"""What the sidecar's imports cost: wall time, RSS, and the biggest modules.

    .venv/bin/python bench/sidecar_imports.py [SIDECAR_DIR]

SIDECAR_DIR (default ``sidecar/``) lets you measure another tree, e.g. the last
commit: ``git archive HEAD sidecar | tar -x -C /tmp/before`` then pass
``/tmp/before/sidecar``.

Runs a fresh interpreter that imports what ``python -m natsmesh_sidecar``
loads (aiohttp and importlib.metadata blocked, as ``__main__`` does for non-websocket URLs) under
``-X importtime``, then prints the total, the RSS and the top cumulative imports.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CODE = """
import re, sys, time
t = time.perf_counter()
import natsmesh_sidecar.__main__ as m
m._block_websocket_deps("nats://127.0.0.1:4222")
m._import_nats_without_metadata()
import natsmesh_sidecar.app
dt = time.perf_counter() - t
rss = int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
print(f"imports {dt * 1000:.0f} ms, RSS {rss:.1f} MB, pydantic loaded: {'pydantic' in sys.modules}")
"""


def main() -> int:
    sidecar_dir = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "sidecar")
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", CODE],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": sidecar_dir},
    )
    print(out.stdout.strip())
    rows = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self_us, cum_us, name = line[len("import time:") :].split("|")
        rows.append((int(cum_us), name.rstrip()))
    rows.sort(reverse=True)
    print("biggest cumulative imports (ms):")
    for cum, name in rows[:12]:
        print(f"  {cum / 1000:7.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
