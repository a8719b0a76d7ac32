"""The table file is applied once at start, then again only when it changes."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from natsmesh_sidecar.policy.table import watch_file
from natsmesh_sidecar.wire import MeshTable

pytestmark = pytest.mark.unit


def write(path: Path, service: str, mtime: float) -> None:
    path.write_text(json.dumps({"namespace": "shop", "service": service}))
    os.utime(path, (mtime, mtime))


async def test_the_table_applied_at_start_is_not_applied_again(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    write(path, "orders", 1_000.0)
    seen: list[str] = []
    changed = asyncio.Event()
    stop = asyncio.Event()

    def on_table(table: MeshTable) -> None:
        seen.append(table.service)
        changed.set()

    watcher = asyncio.create_task(watch_file(str(path), on_table, 0.01, stop, since=1_000.0))
    try:
        await asyncio.sleep(0.1)
        assert seen == []
        write(path, "payments", 2_000.0)
        await asyncio.wait_for(changed.wait(), 5)
        assert seen == ["payments"]
    finally:
        stop.set()
        await watcher
