"""The user commands start without nats-py's websocket transport, and a
websocket URL still connects (natsmesh_sidecar.natsload).

Against a real operator-mode nats-server with a websocket listener: a fresh
process blocks aiohttp as ``natsmesh check``/``status``/``tap`` do, then
connects as the system user over ``nats://`` (aiohttp stays out) or ``ws://``
(it is loaded for that connection) and asks the server a ``$SYS`` question.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from natsmesh_operator import cli
from natsmesh_operator.wiring import bootstrap
from tests.fixtures.nats_server import NatsServer, free_port, running

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SCRIPT = """
import asyncio, json, os, sys
from natsmesh_sidecar import natsload
natsload.without_websocket_transport()
from natsmesh_operator.wiring.apply import connect_creds

async def main() -> None:
    before = sys.modules.get("aiohttp", "absent")
    nc = await connect_creds(os.environ["URL"], os.environ["CREDS"])
    try:
        reply = await nc.request("$SYS.REQ.SERVER.PING", b"", timeout=5)
    finally:
        await nc.close()
    after = sys.modules.get("aiohttp", "absent")
    print(json.dumps({
        "before": before is None,
        "after": None if after is None else getattr(after, "__name__", str(after)),
        "server": json.loads(reply.data)["server"]["name"],
    }))

asyncio.run(main())
"""


@dataclass
class WsServer:
    server: NatsServer
    ws_port: int
    creds: str


@pytest.fixture
def ws_nats(tmp_path: Path) -> Iterator[WsServer]:
    boot = bootstrap.create_or_load(tmp_path / "bootstrap", resolver_dir=str(tmp_path / "jwt"))
    ws_port = free_port()
    websocket = f"websocket {{ listen: 127.0.0.1:{ws_port}, no_tls: true }}\n"
    with running(tmp_path / "nats", boot.auth_conf() + websocket) as server:
        yield WsServer(server, ws_port, boot.system_user_creds)


def connect_in_fresh_process(url: str, creds: str) -> dict[str, object]:
    env = {**os.environ, "URL": url, "CREDS": creds}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_a_tcp_url_connects_without_aiohttp(ws_nats: WsServer) -> None:
    got = connect_in_fresh_process(ws_nats.server.url, ws_nats.creds)
    assert got == {"before": True, "after": None, "server": f"test_{ws_nats.server.port}"}


def test_a_websocket_url_brings_the_transport_back(ws_nats: WsServer) -> None:
    url = f"ws://127.0.0.1:{ws_nats.ws_port}"
    got = connect_in_fresh_process(url, ws_nats.creds)
    assert got == {"before": True, "after": "aiohttp", "server": f"test_{ws_nats.server.port}"}


def test_the_user_commands_start_without_aiohttp() -> None:
    """What each lean command's module pulls in, loaded as ``natsmesh`` loads it."""
    code = (
        "import sys, json, importlib\n"
        "from natsmesh_operator import cli\n"
        "from natsmesh_sidecar import natsload\n"
        "natsload.without_websocket_transport()\n"
        "for name in sorted(cli.LEAN_NATS):\n"
        "    importlib.import_module(cli.COMMANDS[name][0])\n"
        "print(json.dumps([m for m, v in sys.modules.items() if v is not None\n"
        "                  and m.split('.')[0] in ('aiohttp', 'kopf')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout) == []
    assert {"check", "status", "tap"} <= cli.LEAN_NATS
