"""Events through JetStream: idempotent publish, durable delivery, nak/backoff, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, RawStreamMsg, StorageType, StreamConfig

from natsmesh_operator.wiring.jetstream import DONE_MIN_MS, done_stream_config
from natsmesh_sidecar import subjects
from natsmesh_sidecar.app import Sidecar
from natsmesh_sidecar.config import Delivery
from natsmesh_sidecar.events.completed import key_token
from tests.fixtures.nats_server import NatsServer
from tests.integration.sidecar.sidecar_harness import (
    AppReply,
    AppRequest,
    Client,
    TestApp,
    request,
    settings,
    table,
)

pytestmark = pytest.mark.integration

TOPIC = "created"
STREAM = subjects.stream_name("orders")
CONSUMER = subjects.consumer_name("billing", "orders", TOPIC)
DLQ = subjects.dead_letter_subject("shop", "billing", CONSUMER)


async def make_dead_letter_stream(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(
            StreamConfig(
                name="DLQ_billing", subjects=[subjects.dead_letter_wildcard("shop", "billing")]
            )
        )
    finally:
        await nc.close()


async def make_stream_and_consumer(
    url: str, *, max_deliver: int = 5, ack_wait: float = 5.0, dead_letters: bool = True
) -> None:
    """What the operator would create: the publisher's stream, the durable
    consumer, and the subscriber's completed-key bucket (exactlyOnce)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    created = await nc.request(
        f"{subjects.JS_API_PREFIX}.STREAM.CREATE.{subjects.done_stream()}",
        json.dumps(done_stream_config(DONE_MIN_MS)).encode(),
        timeout=5,
    )
    assert b'"error"' not in created.data, created.data
    await js.add_stream(
        StreamConfig(
            name=STREAM,
            subjects=[subjects.event_wildcard("shop", "orders")],
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
    )
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=max_deliver,
            ack_wait=ack_wait,
            filter_subject=subjects.event_subject("shop", "orders", TOPIC),
        ),
    )
    await nc.close()
    if dead_letters:
        await make_dead_letter_stream(url)


@dataclass
class EventMesh:
    publisher: Sidecar
    subscriber: Sidecar
    app: TestApp
    attempts: dict[str, int]
    acked: list[str]


def delivery(**kw: object) -> Delivery:
    return Delivery.model_validate(
        {
            "stream": STREAM,
            "consumer": CONSUMER,
            "topic": TOPIC,
            "source": "orders.shop",
            "path": "/hooks/created",
            "deadLetterSubject": DLQ,
            "backoffMs": [50, 100],
            "maxDeliver": 5,
            **kw,
        }
    )


async def start_event_mesh(
    server: NatsServer, fail_times: int = 0, fail_always: bool = False, **dkw: object
) -> EventMesh:
    attempts: dict[str, int] = {}
    acked: list[str] = []

    async def handler(req: AppRequest) -> AppReply:
        key = req.header("idempotency-key") or ""
        attempts[key] = attempts.get(key, 0) + 1
        if fail_always or attempts[key] <= fail_times:
            return AppReply(500, [], b"nope")
        acked.append(key)
        return AppReply(200, [], b"ok")

    app = await TestApp(handler).start()
    publisher = Sidecar(
        settings("orders", "shop", server.url), table("shop", "orders", publishes=(TOPIC,))
    )
    subscriber = Sidecar(
        settings("billing", "shop", server.url, app.port),
        table("shop", "billing", subscriptions=(delivery(**dkw),)),
    )
    for s in (publisher, subscriber):
        await s.start()
        await s.wait_ready()
    return EventMesh(publisher, subscriber, app, attempts, acked)


async def stop_event_mesh(m: EventMesh) -> None:
    await m.publisher.stop()
    await m.subscriber.stop()
    await m.app.stop()


@pytest.fixture
async def js_server(nats_server: NatsServer) -> NatsServer:
    await make_stream_and_consumer(nats_server.url)
    return nats_server


async def stream_msgs(url: str, stream: str = STREAM) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.messages)
    finally:
        await nc.close()


async def wait_for(cond: object, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_publish_202_after_ack_and_idempotency_key_stored_once(js_server: NatsServer) -> None:
    m = await start_event_mesh(js_server)
    try:
        port = m.publisher.outbound_port
        r1 = await request(
            port,
            "POST",
            f"/_events/{TOPIC}",
            headers=[("Idempotency-Key", "k-1")],
            body=b'{"id":1}',
        )
        r2 = await request(
            port,
            "POST",
            f"/_events/{TOPIC}",
            headers=[("Idempotency-Key", "k-1")],
            body=b'{"id":1}',
        )
        assert r1.status == 202
        assert r2.status == 202
        assert r1.json()["duplicate"] is False
        assert r2.json()["duplicate"] is True
        assert r1.json()["seq"] == r2.json()["seq"]
        assert await stream_msgs(js_server.url) == 1
        await wait_for(lambda: m.acked == ["k-1"])
        r3 = await request(port, "POST", "/_events/unknown-topic", body=b"x")
        assert r3.status == 404
        assert r3.json()["error"] == "unknown_topic"
        r4 = await request(port, "GET", f"/_events/{TOPIC}")
        assert r4.status == 405
    finally:
        await stop_event_mesh(m)


async def test_an_oversized_event_sent_whole_gets_its_413(js_server: NatsServer) -> None:
    """A client that writes its whole body before reading (most do) reads the
    413, not a connection reset: the sidecar reads and drops the rest of the
    body before it closes (closing with unread bytes makes the kernel send a
    RST, which discards the answer on its way). Nothing is published, and the
    next event on a new connection is stored."""
    m = await start_event_mesh(js_server)
    try:
        port = m.publisher.outbound_port
        body = b"x" * (4 * 1024 * 1024)  # past the server's 1 MiB max_payload
        head = (
            f"POST /_events/{TOPIC} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.split(b" ")[:2] == [b"HTTP/1.1", b"413"], answer[:300]
        payload = json.loads(rest.partition(b"\r\n\r\n")[2])
        assert payload["error"] == "payload_too_large"
        assert await stream_msgs(js_server.url) == 0
        ok = await request(port, "POST", f"/_events/{TOPIC}", body=b'{"id":2}')
        assert ok.status == 202
        assert await stream_msgs(js_server.url) == 1
    finally:
        await stop_event_mesh(m)


async def test_fails_twice_then_succeeds_delivered_three_times_acked_once(
    js_server: NatsServer,
) -> None:
    m = await start_event_mesh(js_server, fail_times=2)
    try:
        r = await request(
            m.publisher.outbound_port,
            "POST",
            f"/_events/{TOPIC}",
            headers=[("Idempotency-Key", "e-1")],
            body=b"{}",
        )
        assert r.status == 202
        await wait_for(lambda: m.acked == ["e-1"])
        await asyncio.sleep(0.3)  # nothing more arrives after the ack
        assert m.attempts == {"e-1": 3}
        assert m.acked == ["e-1"]
        deliveries = [q.header("nm-event-delivery") for q in m.app.requests]
        assert deliveries == ["1", "2", "3"]
        nc = await nats.connect(js_server.url)
        info = await nc.jetstream().consumer_info(STREAM, CONSUMER)
        await nc.close()
        assert info.num_ack_pending == 0
        assert info.num_pending == 0
        assert info.delivered.consumer_seq == 3
        assert info.ack_floor.stream_seq == 1
    finally:
        await stop_event_mesh(m)


async def test_exactly_once_double_ack(js_server: NatsServer) -> None:
    m = await start_event_mesh(js_server, mode="exactlyOnce")
    try:
        r = await request(
            m.publisher.outbound_port,
            "POST",
            f"/_events/{TOPIC}",
            headers=[("Idempotency-Key", "x-1")],
            body=b"{}",
        )
        assert r.status == 202
        await wait_for(lambda: m.acked == ["x-1"])
        nc = await nats.connect(js_server.url)
        info = await nc.jetstream().consumer_info(STREAM, CONSUMER)
        await nc.close()
        assert info.num_ack_pending == 0
    finally:
        await stop_event_mesh(m)


async def test_an_ack_lost_after_the_app_answered_is_recorded_as_the_apps_success(
    nats_server: NatsServer,
) -> None:
    """exactlyOnce, and NATS goes away while the app handles the event: the
    app's 200 stays on record (``ack_lost``, not status 0 / ``error``), the
    key is recorded as completed after the 200 (kept in memory while NATS is
    down, written to the bucket once it is back), and the app sees the key
    once. Before the completed-key record it saw it twice: the server
    redelivered after ackWait. Now the redelivery, if the server makes one, is
    a ``duplicate`` acked without the app; if the ack the client buffered
    during the outage lands first there is none (which one happens depends on
    when the client noticed the outage: the record's write now comes first;
    tests/integration/sidecar/test_sidecar_event_dedup.py forces the
    redelivery)."""
    await make_stream_and_consumer(nats_server.url, ack_wait=1.0)
    m = await start_event_mesh(nats_server, mode="exactlyOnce")
    original = m.app.handler
    outage = asyncio.Event()

    async def handler(req: AppRequest) -> AppReply:
        if not outage.is_set():
            outage.set()
            await asyncio.to_thread(nats_server.stop)
        return await original(req)

    m.app.handler = handler
    delivered = m.subscriber.metrics.events_delivered
    try:
        r = await request(
            m.publisher.outbound_port, "POST", f"/_events/{TOPIC}",
            headers=[("Idempotency-Key", "lost-1")], body=b"{}",
        )  # fmt: skip
        assert r.status == 202
        await wait_for(lambda: delivered.labels(TOPIC, "ack_lost").get() == 1)
        assert delivered.labels(TOPIC, "error").get() == 0
        await asyncio.to_thread(nats_server.start)
        done = m.subscriber.consumers[(STREAM, CONSUMER)].done
        assert done is not None
        await wait_for(lambda: done.unwritten == 0, within=20)
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            # Polling a remote counter: there is no local event to wait on.
            while (await js.consumer_info(STREAM, CONSUMER)).num_ack_pending:
                assert loop.time() < deadline, "the event was never acked"
                await asyncio.sleep(0.1)
        finally:
            await nc.close()
        await asyncio.sleep(1.5)  # past ackWait: nothing more may reach the app
        assert m.acked == ["lost-1"]
        assert delivered.labels(TOPIC, "delivered").get() == 0
        # The delayed write landed: another replica would find the key too.
        nc = await nats.connect(nats_server.url)
        try:
            scope = subjects.done_scope("shop", CONSUMER)
            got = await nc.request(
                subjects.done_direct_get(scope, key_token("lost-1")), b"", timeout=2
            )
            assert (got.headers or {}).get("Status") is None, got.headers
        finally:
            await nc.close()
    finally:
        await stop_event_mesh(m)


async def last_dead_letter(url: str) -> RawStreamMsg:
    """The last message DLQ_billing keeps, once it keeps one (5 s at most)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    # Polling a remote counter: there is no local event to wait on.
    while await stream_msgs(url, "DLQ_billing") < 1 and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    nc = await nats.connect(url)
    try:
        return await nc.jetstream().get_last_msg("DLQ_billing", DLQ)
    finally:
        await nc.close()


async def test_dead_letter_after_max_deliver(nats_server: NatsServer) -> None:
    await make_stream_and_consumer(nats_server.url, max_deliver=3)
    m = await start_event_mesh(nats_server, fail_always=True, maxDeliver=3, backoffMs=[10])
    try:
        r = await request(
            m.publisher.outbound_port,
            "POST",
            f"/_events/{TOPIC}",
            headers=[("Idempotency-Key", "d-1")],
            body=b"dead",
        )
        assert r.status == 202
        await wait_for(lambda: m.attempts.get("d-1") == 3)
        msg = await last_dead_letter(nats_server.url)
        assert msg.data == b"dead"
        assert msg.headers is not None
        assert msg.headers["Nm-Dead-Deliveries"] == "3"
        metrics = (await request(m.subscriber.admin_port, "GET", "/metrics")).body.decode()
        labels = '{source="orders.shop",topic="created"}'
        assert f"natsmesh_sidecar_events_dead_lettered_total{labels} 1.0" in metrics
        # The consumer's lag, from the last delivery's metadata: nothing left.
        assert f"natsmesh_sidecar_events_pending{labels} 0.0" in metrics
    finally:
        await stop_event_mesh(m)


async def test_a_dead_letter_waits_for_its_stream_to_answer(nats_server: NatsServer) -> None:
    """A dead-letter stream that does not answer yet (electing a leader, or
    created a moment late) is waited for, like an event's: the dead letter is
    kept, not published to no one."""
    await make_stream_and_consumer(nats_server.url, max_deliver=2, dead_letters=False)
    m = await start_event_mesh(nats_server, fail_always=True, maxDeliver=2, backoffMs=[10])
    try:
        r = await request(
            m.publisher.outbound_port,
            "POST",
            f"/_events/{TOPIC}",
            headers=[("Idempotency-Key", "late-1")],
            body=b"late",
        )
        assert r.status == 202
        await wait_for(lambda: m.attempts.get("late-1") == 2)
        # The sidecar is now retrying the dead-letter publish (3 s at most).
        await asyncio.sleep(0.3)
        await make_dead_letter_stream(nats_server.url)
        msg = await last_dead_letter(nats_server.url)
        assert msg.data == b"late"
        assert msg.headers is not None
        assert msg.headers["Nm-Dead-Deliveries"] == "2"
    finally:
        await stop_event_mesh(m)


async def test_server_restart_mid_load_loses_no_acknowledged_event(js_server: NatsServer) -> None:
    m = await start_event_mesh(js_server)
    accepted: set[str] = set()
    stop = asyncio.Event()

    async def producer(worker: int) -> None:
        c: Client | None = None
        i = 0
        while not stop.is_set():
            key = f"w{worker}-{i}"
            try:
                if c is None:
                    c = await Client.open(m.publisher.outbound_port)
                r = await c.request(
                    "POST",
                    f"/_events/{TOPIC}",
                    headers=[("Idempotency-Key", key)],
                    body=key.encode(),
                    wait=8,
                )
            except (ConnectionError, TimeoutError):
                if c is not None:
                    c.close()
                c = None
                await asyncio.sleep(0.02)
                continue
            if r.status == 202:
                accepted.add(key)
                i += 1
            else:
                assert r.status in (503, 504), r.body
                await asyncio.sleep(0.02)
        if c is not None:
            c.close()

    try:
        tasks = [asyncio.create_task(producer(w)) for w in range(4)]
        await wait_for(lambda: len(accepted) >= 50)
        js_server.stop()
        await asyncio.sleep(0.5)
        js_server.start()
        n_at_restart = len(accepted)
        await wait_for(lambda: len(accepted) >= n_at_restart + 50, within=20)
        stop.set()
        await asyncio.gather(*tasks)
        # Every event the sidecar answered 202 for is in the stream, and gets delivered.
        nc = await nats.connect(js_server.url)
        js = nc.jetstream()
        stored: set[str] = set()
        info = await js.stream_info(STREAM)
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(Exception):
                stored.add(((await js.get_msg(STREAM, seq)).data or b"").decode())
        await nc.close()
        assert accepted <= stored, sorted(accepted - stored)[:10]
        await wait_for(lambda: accepted <= set(m.acked), within=20)
    finally:
        stop.set()
        await stop_event_mesh(m)
