"""``python -m natsmesh_sidecar`` as a real process: env settings, readiness, SIGTERM drain."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest

from natsmesh_sidecar.app import Sidecar
from tests.fixtures.nats_server import NatsServer, free_port
from tests.integration.sidecar.sidecar_harness import TestApp, destination, request, settings, table

pytestmark = pytest.mark.integration


async def test_subprocess_serves_then_drains_on_sigterm(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    app = await TestApp().start()
    table_file = tmp_path / "table.json"
    table_file.write_bytes(table("shop", "orders").to_json())
    admin_port, listen_port = free_port(), free_port()
    env = {
        **os.environ,
        "NATSMESH_SERVICE": "orders",
        "NATSMESH_NAMESPACE": "shop",
        "NATSMESH_NATS_URL": nats_server.url,
        "NATSMESH_APP_PORT": str(app.port),
        "NATSMESH_LISTEN_PORT": str(listen_port),
        "NATSMESH_ADMIN_HOST": "127.0.0.1",
        "NATSMESH_ADMIN_PORT": str(admin_port),
        "NATSMESH_TABLE_FILE": str(table_file),
        "NATSMESH_DRAIN_SECONDS": "5",
    }
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before the event loop has work
        [sys.executable, "-m", "natsmesh_sidecar"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    caller = Sidecar(
        settings("web", "shop", nats_server.url),
        table("shop", "web", destinations=[destination("shop", "orders")]),
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        ready = False
        while loop.time() < deadline and not ready:
            try:
                ready = (await request(admin_port, "GET", "/readyz")).status == 200
            except OSError:
                await asyncio.sleep(0.1)
        assert ready, cast(io.BufferedReader, proc.stderr).read1().decode() if proc.stderr else ""
        await caller.start()
        await caller.wait_ready()
        assert (await request(caller.outbound_port, "GET", "/hello")).status == 200
        # A request in flight when SIGTERM arrives still completes.
        slow = asyncio.create_task(request(caller.outbound_port, "GET", "/sleep/800"))
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        r = await slow
        assert r.status == 200
        assert r.body == b"slept"
        rc = await loop.run_in_executor(None, proc.wait, 10)
        assert rc == 0
        # Drained: nothing serves the subject any more.
        r = await request(caller.outbound_port, "GET", "/after")
        assert r.status == 503
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "draining" in err
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert '"path":"/hello"' in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await caller.stop()
        await app.stop()
