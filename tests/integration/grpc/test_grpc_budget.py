"""Many open gRPC calls on one callee replica: its byte budget holds what
they hold, not a stream window each (docs/architecture.md, "The callee's
byte budget").

One orders replica (grpc_harness, the default ``NATSMESH_INBOUND_MAX_BYTES``)
and forty calls open at once whose answers have not begun (each used to
reserve a stream window until then: the 8th was refused). The budget's
bound under a flood of uploads is shown by
tests/integration/stream/test_stream_bodies.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tests.integration.grpc.grpc_harness import grpc_mesh, method

pytestmark = pytest.mark.integration

#: Open at once on the one replica, none answered yet: each used to reserve
#: 1.125 MiB of the 8 MiB budget until its response head, so the 8th was
#: refused UNAVAILABLE ("overloaded").
CLIENT_STREAMS = 32
BIDI = 8


async def test_forty_open_calls_on_one_replica_all_succeed(tmp_path: Path) -> None:
    """Client streams that sent a message and wait (the app answers at their
    end), bidirectional streams waiting for their first answer, a unary call
    beside them: all go through."""
    async with grpc_mesh(tmp_path, replicas=1) as mesh, mesh.channel() as channel:
        summing = []
        for i in range(CLIENT_STREAMS):
            call = channel.stream_unary(method("Sum"))(timeout=30)
            await call.write(b"x" * i)
            summing.append(call)
        chats = []
        for _ in range(BIDI):
            call = channel.stream_stream(method("Chat"))(timeout=30)
            await call.write(b"")
            chats.append(call)
        # Every call reached the app (it counts them as they start).
        for _ in range(100):
            if mesh.states[0].calls == CLIENT_STREAMS + BIDI:
                break
            await asyncio.sleep(0.05)
        assert mesh.states[0].calls == CLIENT_STREAMS + BIDI

        assert await channel.unary_unary(method("Echo"))(b"beside", timeout=10) == b"beside"

        async def chat(call: grpc.aio.StreamStreamCall[bytes, bytes]) -> None:
            assert await call.read() == b"re:"
            await call.write(b"again")
            assert await call.read() == b"re:again"
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK

        async def summed(i: int, call: grpc.aio.StreamUnaryCall[bytes, bytes]) -> None:
            await call.write(b"y" * 1000)
            await call.done_writing()
            assert await call == b"2:%d" % (i + 1000)

        await asyncio.wait_for(
            asyncio.gather(*map(chat, chats), *(summed(i, c) for i, c in enumerate(summing))), 20
        )
