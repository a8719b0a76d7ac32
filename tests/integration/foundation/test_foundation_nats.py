"""The nats-server fixture is a real server: request-reply and JetStream acks work."""

from __future__ import annotations

import uuid

import nats
import pytest
from nats.aio.msg import Msg

from tests.fixtures.nats_server import NatsServer

pytestmark = pytest.mark.integration


async def test_request_reply(nats_server: NatsServer) -> None:
    subject = f"probe.{uuid.uuid4().hex}"
    nc = await nats.connect(nats_server.url)
    try:

        async def echo(msg: Msg) -> None:
            await msg.respond(b"pong:" + msg.data)

        await nc.subscribe(subject, cb=echo)
        reply = await nc.request(subject, b"ping", timeout=2)
        assert reply.data == b"pong:ping"
    finally:
        await nc.close()


async def test_jetstream_publish_is_acknowledged(nats_server: NatsServer) -> None:
    stream = f"PROBE_{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        ack = await js.publish(f"{stream}.x", b"hello")
        assert ack.stream == stream
        assert ack.seq == 1
        info = await js.stream_info(stream)
        assert info.state.messages == 1
    finally:
        await nc.close()


async def test_jetstream_survives_restart(nats_server: NatsServer) -> None:
    stream = f"PROBE_{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{stream}.>"])
    await js.publish(f"{stream}.x", b"kept")
    await nc.close()
    nats_server.restart()
    nc = await nats.connect(nats_server.url)
    try:
        msg = await nc.jetstream().get_msg(stream, 1)
        assert msg.data == b"kept"
    finally:
        await nc.close()
