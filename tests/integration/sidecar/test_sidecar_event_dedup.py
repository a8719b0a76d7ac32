"""exactlyOnce's completed-key record against a real nats-server and real sidecar processes.

A redelivery of an event the app already answered 2xx for -- its ack lost
with a killed sidecar or a killed nats-server -- is acked by the sidecar and
not handed to the app again, on whichever replica it lands. What remains is
the sidecar-crash window: a sidecar killed after the app answered but before
it wrote the key.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nats
import pytest

from natsmesh_sidecar import subjects
from natsmesh_sidecar.app import Sidecar
from natsmesh_sidecar.events.completed import key_token
from tests.fixtures.nats_server import NatsServer, free_port, running, stop_process
from tests.integration.sidecar.sidecar_harness import (
    AppReply,
    AppRequest,
    TestApp,
    request,
    settings,
    table,
)
from tests.integration.sidecar.test_sidecar_events import (
    CONSUMER,
    STREAM,
    TOPIC,
    delivery,
    make_stream_and_consumer,
    wait_for,
)

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

#: The sidecar's fetch batch: the most deliveries one sidecar holds at once,
#: so the most a sidecar killed between the app's 2xx and the write can repeat.
BATCH = 16
EVENT_SUBJECT = subjects.event_subject("shop", "orders", TOPIC)

#: ``dying`` may not ack: its acks are lost as a killed sidecar's are, every time.
USERS = """
authorization {
  users = [
    {user: ops, password: ops}
    {user: dying, password: dying, permissions: {publish: {deny: ["$JS.ACK.>"]}}}
  ]
}
"""


def url_as(server: NatsServer, user: str) -> str:
    return f"nats://{user}:{user}@127.0.0.1:{server.port}"


class Replica:
    """``python -m natsmesh_sidecar`` subscribing as billing.shop, exactlyOnce."""

    def __init__(self, url: str, app_port: int, workdir: Path, *, dedup: bool = True) -> None:
        self.admin_port = free_port()
        table_file = workdir / "billing-table.json"
        sub = delivery(mode="exactlyOnce")
        table_file.write_bytes(table("shop", "billing", subscriptions=(sub,)).to_json())
        self.stderr = workdir / f"sidecar-{self.admin_port}.log"
        env = {
            **os.environ,
            "NATSMESH_SERVICE": "billing",
            "NATSMESH_NAMESPACE": "shop",
            "NATSMESH_NATS_URL": url,
            "NATSMESH_APP_PORT": str(app_port),
            "NATSMESH_LISTEN_PORT": str(free_port()),
            "NATSMESH_ADMIN_HOST": "127.0.0.1",
            "NATSMESH_ADMIN_PORT": str(self.admin_port),
            "NATSMESH_TABLE_FILE": str(table_file),
            "NATSMESH_EVENT_DEDUP": "true" if dedup else "false",
        }
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "natsmesh_sidecar"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    async def ready(self, within: float = 20) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            assert self.proc.poll() is None, self.stderr.read_text()[-2000:]
            try:
                if (await request(self.admin_port, "GET", "/readyz")).status == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"sidecar not ready: {self.stderr.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: nothing in hand is acked, nothing is written."""
        stop_process(self.proc, signal.SIGKILL)

    async def metrics(self) -> str:
        return (await request(self.admin_port, "GET", "/metrics")).body.decode()


class CountingApp:
    """The subscriber's app: every delivery's key and when it arrived; always 200."""

    def __init__(self, delay: float = 0.0) -> None:
        self.seen: list[tuple[str, float]] = []
        self.delay = delay
        self.app = TestApp(self.handle)

    async def handle(self, req: AppRequest) -> AppReply:
        self.seen.append((req.header("idempotency-key") or "", time.monotonic()))
        if self.delay:
            await asyncio.sleep(self.delay)
        return AppReply(200, [], b"ok")

    def keys(self) -> Counter[str]:
        return Counter(k for k, _ in self.seen)


async def record_exists(url: str, key: str) -> bool:
    nc = await nats.connect(url)
    try:
        scope = subjects.done_scope("shop", CONSUMER)
        got = await nc.request(subjects.done_direct_get(scope, key_token(key)), b"", timeout=2)
        return (got.headers or {}).get("Status") is None
    finally:
        await nc.close()


async def settled(url: str, within: float) -> None:
    """Wait until the consumer has nothing pending or unacked."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            info = await js.consumer_info(STREAM, CONSUMER)
            if not info.num_ack_pending and not info.num_pending:
                return
            assert loop.time() < deadline, f"consumer not settled: {info}"
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


@pytest.mark.timeout(90)
async def test_a_replica_killed_before_its_ack_another_skips_the_redelivery(
    tmp_path: Path,
) -> None:
    """Replica A hands the event to the app, the app answers 200, A writes the
    key and its ack is lost (its user may not ack: what a SIGKILL right before
    the ack does, every time); A is SIGKILLed. Replica B gets the redelivery,
    finds the key, acks it and does not hand it to the app."""
    with running(tmp_path / "nats", USERS) as server:
        ops = url_as(server, "ops")
        await make_stream_and_consumer(ops, ack_wait=1.0)
        counting = CountingApp()
        await counting.app.start()
        a = Replica(url_as(server, "dying"), counting.app.port, tmp_path)
        b: Sidecar | None = None
        nc = await nats.connect(ops)
        try:
            await a.ready()
            ack = await nc.jetstream().publish(EVENT_SUBJECT, b"{}", headers={"Nats-Msg-Id": "r-1"})
            assert ack.seq == 1
            await wait_for(lambda: counting.keys()["r-1"] == 1)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            # Polling a remote record: there is no local event to wait on.
            while not await record_exists(ops, "r-1"):
                assert loop.time() < deadline, a.stderr.read_text()[-2000:]
                await asyncio.sleep(0.05)
            a.kill()
            info = await nc.jetstream().consumer_info(STREAM, CONSUMER)
            assert info.num_ack_pending == 1  # A's ack never arrived
            b = Sidecar(
                settings("billing", "shop", ops, counting.app.port),
                table("shop", "billing", subscriptions=(delivery(mode="exactlyOnce"),)),
            )
            await b.start()
            await b.wait_ready()
            delivered = b.metrics.events_delivered
            await wait_for(lambda: delivered.labels(TOPIC, "duplicate").get() >= 1, within=15)
            await settled(ops, within=10)
            assert counting.keys() == {"r-1": 1}
            assert delivered.labels(TOPIC, "delivered").get() == 0
            assert b.metrics.events_dedup_unavailable.labels(TOPIC, "lookup").get() == 0
        finally:
            a.kill()
            if b is not None:
                await b.stop()
            await nc.close()
            await counting.app.stop()


EVENTS = 2000
SERVER_KILL_AT = 0.3
SIDECAR_KILL_AT = 0.6


async def chaos(tmp_path: Path, *, dedup: bool) -> tuple[Counter[str], CountingApp, float]:
    """2,000 events; nats-server SIGKILLed at 30% and restarted; the subscriber
    sidecar SIGKILLed at 60% and a new one started. Returns the app's
    per-key counts, the app, and when the sidecar was killed."""
    with running(tmp_path / "nats") as server:
        await make_stream_and_consumer(server.url, ack_wait=2.0)
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            for i in range(EVENTS):
                await js.publish(EVENT_SUBJECT, b"{}", headers={"Nats-Msg-Id": f"c-{i}"})
        finally:
            await nc.close()
        counting = CountingApp(delay=0.002)
        await counting.app.start()
        replicas = [Replica(server.url, counting.app.port, tmp_path, dedup=dedup)]
        try:
            await replicas[0].ready()
            await wait_for(lambda: len(counting.keys()) >= EVENTS * SERVER_KILL_AT, within=30)
            stop_process(server.proc, signal.SIGKILL)
            server.proc = None
            await asyncio.to_thread(server.start)
            await wait_for(lambda: len(counting.keys()) >= EVENTS * SIDECAR_KILL_AT, within=30)
            replicas[0].kill()
            # The kill (a blocking wait) held this loop: what the sidecar handed
            # over before it died may still sit unread in the app's sockets, and
            # the app stamps a delivery when it reads it. Let the loop read it, so
            # the boundary falls between the dead sidecar's handovers and the
            # next one's (which cannot start before the Replica below exists).
            await asyncio.sleep(0.5)
            killed_at = time.monotonic()
            replicas.append(Replica(server.url, counting.app.port, tmp_path, dedup=dedup))
            await replicas[1].ready()
            await wait_for(lambda: len(counting.keys()) == EVENTS, within=40)
            await settled(server.url, within=20)
            await asyncio.sleep(2.5)  # past ackWait: a late redelivery shows
            return counting.keys(), counting, killed_at
        finally:
            for r in replicas:
                r.kill()
            await counting.app.stop()


def duplicates(keys: Counter[str]) -> dict[str, int]:
    return {k: n for k, n in keys.items() if n > 1}


@pytest.mark.timeout(150)
async def test_chaos_dedup_removes_all_but_the_sidecar_crash_window(tmp_path: Path) -> None:
    """The same chaos run without and with the completed-key record.

    Nothing the stream acknowledged is lost either way (every key reaches
    the app). With the record, a key the app sees twice is one the killed
    sidecar had handed over before it died and the next one handed over after
    (the app answered, the sidecar died before writing the key), and there
    are at most a fetch batch of them; the server's kill costs none.
    """
    before, _, _ = await chaos(tmp_path / "off", dedup=False)
    after, counting, killed_at = await chaos(tmp_path / "on", dedup=True)
    dup_before, dup_after = duplicates(before), duplicates(after)
    log.warning(
        "chaos duplicates: dedup off %d keys (%d extra deliveries), dedup on %d keys (%d extra)",
        len(dup_before),
        sum(dup_before.values()) - len(dup_before),
        len(dup_after),
        sum(dup_after.values()) - len(dup_after),
    )
    expected = {f"c-{i}" for i in range(EVENTS)}
    assert set(before) == expected
    assert set(after) == expected
    assert len(dup_after) <= BATCH, dup_after
    for key, n in dup_after.items():
        times = [t for k, t in counting.seen if k == key]
        assert n == 2, (key, n)
        assert times[0] < killed_at <= times[1], (key, times, killed_at)
