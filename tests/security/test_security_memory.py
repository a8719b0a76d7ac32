"""A permitted caller cannot run the callee's sidecar out of memory.

The callee sidecar runs as its own process (``python -m natsmesh_sidecar``,
default limits) so its RSS is measured alone. The attacker is a raw nats-py
client on the service subject, as anyone holding a permitted caller's creds
could be: waves of concurrent ~1 MB bodies to a slow app path with a huge
``Nm-Timeout-Ms``, then thousands of small requests each claiming a fresh
random ``Nm-Source``. What must hold:

* peak RSS (``VmHWM``) stays within the sidecar's budget: the request bytes
  it holds are bounded (``NATSMESH_INBOUND_MAX_BYTES``), the rest is told 503;
* every attacking request gets an answer (200, 503, or 504 at the callee's
  ceiling), none is left to time out;
* the request metrics keep at most ``MAX_SOURCES`` distinct sources (+ "_other");
* a caller's ``Nm-Timeout-Ms`` is clamped by the callee's own ceiling
  (``NATSMESH_INBOUND_TIMEOUT_SECONDS``);
* a legitimate caller's sidecar beside the attack still gets its 200s.

Counts are modest for a shared 2-core box; all sockets are on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import string
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from natsmesh_sidecar import subjects
from natsmesh_sidecar.app import Sidecar
from natsmesh_sidecar.observe import metrics
from tests.fixtures.nats_server import NatsServer, free_port, stop_process
from tests.integration.sidecar.sidecar_harness import (
    AppReply,
    AppRequest,
    TestApp,
    destination,
    request,
    settings,
    table,
)

pytestmark = pytest.mark.timeout(180)

BODY = 1_000_000
WAVES = 3
CONCURRENT = 60
SMALL = 4000
#: The memory limit the chart gives the sidecar container (64Mi,
#: ``sidecar.resources.memoryLimit``): ~33 MB idle; with a 16 MiB byte bound
#: this attack peaked at ~72 MB (an OOM kill under the chart's limit), and
#: without a bound at ~130 MB. The default bound is 8 MiB.
PEAK_RSS_LIMIT_KB = 64 * 1024
SUBJECT = subjects.request_subject("shop", "orders", "v1")


def status_kb(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert found, text
    return int(found.group(1))


@dataclass
class Callee:
    proc: subprocess.Popen[bytes]
    admin_port: int
    app: TestApp


async def slow_app(req: AppRequest) -> AppReply:
    path = req.path.split("?", 1)[0]
    if path.startswith("/sleep/"):
        await asyncio.sleep(int(path.rsplit("/", 1)[1]) / 1000.0)
    elif path == "/slow":
        await asyncio.sleep(0.3)
    return AppReply(200, [], b"ok")


@pytest.fixture
async def callee(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Callee]:
    app = await TestApp(slow_app).start()
    table_file = tmp_path / "table.json"
    table_file.write_bytes(table("shop", "orders").to_json())
    admin_port = free_port()
    env = {
        **os.environ,
        "NATSMESH_SERVICE": "orders",
        "NATSMESH_NAMESPACE": "shop",
        "NATSMESH_NATS_URL": nats_server.url,
        "NATSMESH_APP_PORT": str(app.port),
        "NATSMESH_LISTEN_PORT": str(free_port()),
        "NATSMESH_ADMIN_HOST": "127.0.0.1",
        "NATSMESH_ADMIN_PORT": str(admin_port),
        "NATSMESH_TABLE_FILE": str(table_file),
        "NATSMESH_INBOUND_TIMEOUT_SECONDS": "2",
    }
    with (tmp_path / "callee.log").open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before the attack
            [sys.executable, "-m", "natsmesh_sidecar", "--no-access-log"],
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if (await request(admin_port, "GET", "/readyz")).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "callee.log").read_text()
            await asyncio.sleep(0.1)
        yield Callee(proc, admin_port, app)
    finally:
        stop_process(proc)
        await app.stop()


class Attacker:
    """Raw requests naming any caller it likes (a permitted caller's creds allow
    only its own name; here, on a server without accounts, nothing stops it):
    each reply is awaited in the named caller's inbox, as the callee demands."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.waiting: dict[str, asyncio.Future[Msg]] = {}
        self.seq = 0

    async def start(self) -> None:
        async def on_reply(msg: Msg) -> None:
            fut = self.waiting.pop(msg.subject, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

        await self.nc.subscribe(f"{subjects.INBOX_ROOT}.>", cb=on_reply)

    async def request(self, caller: tuple[str, str], body: bytes, headers: dict[str, str]) -> Msg:
        self.seq += 1
        reply = f"{subjects.inbox_prefix(caller[1])}.{self.seq}"
        fut: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self.waiting[reply] = fut
        subject = subjects.call_subject(SUBJECT, *caller)
        await self.nc.publish(subject, body, reply=reply, headers=headers)
        try:
            return await asyncio.wait_for(fut, 20)
        finally:
            self.waiting.pop(reply, None)


def forged_caller(rnd: random.Random) -> tuple[str, str]:
    """A fresh caller identity per request: the source label the callee would count."""
    if rnd.randrange(3) == 1:  # long junk: each would be a fat label value
        return "ns", "".join(rnd.choices(string.ascii_lowercase, k=2000))
    return f"ns{rnd.randrange(10**6)}", f"{rnd.getrandbits(32):x}"


async def attack(at: Attacker, count: int, body: bytes, path: str, rnd: random.Random) -> list[str]:
    """``count`` requests at once; the Nm-Status of each answer ("none" if not answered)."""

    async def one() -> str:
        headers = {"Nm-Method": "POST", "Nm-Target": path, "Nm-Timeout-Ms": "600000"}
        try:
            msg = await at.request(forged_caller(rnd), body, headers)
        except TimeoutError:
            return "none"
        return (msg.headers or {}).get("Nm-Status", "missing")

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def test_memory_and_cardinality_are_bounded_under_any_caller(
    nats_server: NatsServer, callee: Callee
) -> None:
    pid = callee.proc.pid
    caller = Sidecar(
        settings("web", "shop", nats_server.url),
        table("shop", "web", destinations=[destination("shop", "orders", timeoutMs=10000)]),
        access_log=False,
    )
    await caller.start()
    await caller.wait_ready()
    nc = await nats.connect(nats_server.url, pending_size=256 * 1024 * 1024)
    at = Attacker(nc)
    await at.start()
    rnd = random.Random(12)
    try:
        assert (await request(caller.outbound_port, "GET", "/hello")).status == 200
        idle = status_kb(pid, "VmRSS")

        # Waves of concurrent ~1 MB bodies to a slow path, a legitimate call beside each.
        body = os.urandom(BODY)
        outcomes: list[str] = []
        for _ in range(WAVES):
            legit = asyncio.create_task(request(caller.outbound_port, "GET", "/beside"))
            outcomes += await attack(at, CONCURRENT, body, "/slow", rnd)
            assert (await legit).status in (200, 503)  # 503 is the budget speaking
        assert "none" not in outcomes, "an attacking request was left to time out"
        # 504: the callee's own 2 s ceiling on a busy box; never the caller's 600 s.
        assert set(outcomes) <= {"200", "503", "504"}, set(outcomes)
        assert outcomes.count("200") >= WAVES  # the service kept serving big bodies
        assert outcomes.count("503") > 0  # and refused what it could not hold

        # Many small requests, each with a fresh forged source.
        small: list[str] = []
        for _ in range(SMALL // 200):
            small += await attack(at, 200, b"x", "/fast", rnd)
        assert small.count("200") == len(small)

        peak = status_kb(pid, "VmHWM")
        assert peak < PEAK_RSS_LIMIT_KB, f"peak RSS {peak} kB (idle {idle} kB)"

        exposition = (await request(callee.admin_port, "GET", "/metrics")).body.decode()
        inbound = r'natsmesh_sidecar_requests_total\{[^}]*direction="inbound",source="([^"]*)"'
        sources = set(re.findall(inbound, exposition))
        assert len(sources) <= metrics.MAX_SOURCES + 2, len(sources)  # + "_other" and "-"
        assert metrics.OTHER in sources
        assert max(len(s) for s in sources) <= 253

        # The caller's 600 s timeout is clamped to the callee's 2 s ceiling.
        started = time.monotonic()
        reply = await at.request(
            ("shop", "web"),
            b"",
            {"Nm-Method": "GET", "Nm-Target": "/sleep/5000", "Nm-Timeout-Ms": "600000"},
        )
        took = time.monotonic() - started
        assert (reply.headers or {}).get("Nm-Status") == "504"
        assert (reply.headers or {}).get("Nm-Error") == "app_timeout"
        assert took < 4.5, took

        # The legitimate caller is unaffected once the attack is over.
        for n in range(5):
            r = await request(caller.outbound_port, "GET", f"/after/{n}")
            assert r.status == 200, r.body
    finally:
        await nc.close()
        await caller.stop()
