"""gRPC through two sidecars: every call kind, metadata, errors, deadlines, cancels,
retries on UNAVAILABLE and the gRPC status in the metrics.

One mesh for the module (grpc_harness: an operator-mode nats-server, the
tenant applied by the wiring code, three orders replicas behind their own
sidecars, web's and evil's sidecars): ``grpcio`` clients and servers on
both ends, the sidecars in between speaking HTTP/2 to each and streams over
NATS between them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import time
import urllib.request
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import h2.config
import h2.connection
import h2.events
import pytest
import pytest_asyncio

from tests.integration.grpc.grpc_harness import (
    MIB,
    OPTIONS,
    SLOW_TIMEOUT_MS,
    GrpcMesh,
    grpc_mesh,
    method,
    request_headers,
)
from tests.integration.sidecar.sidecar_harness import request

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GrpcMesh]:
    async with grpc_mesh(tmp_path_factory.mktemp("grpc")) as m:
        yield m


async def test_unary_with_metadata_and_trailers(mesh: GrpcMesh) -> None:
    async with mesh.channel() as channel:
        call = channel.unary_unary(method("Echo"))(
            b"hello", metadata=(("x-meta", "m1"), ("x-meta-bin", b"\x00\xff")), timeout=5
        )
        assert await call == b"hello"
        assert await call.code() == grpc.StatusCode.OK
        initial = dict(await call.initial_metadata())
        trailing = dict(await call.trailing_metadata())
    assert initial["x-head"] == "m1"
    assert trailing["x-trail"] == "end"
    assert trailing["x-trail-bin"] == b"\x00\x01\xff"
    # What the app saw: the client's metadata, binary included, and a deadline.
    seen = [s for s in mesh.states if s.metadata.get("x-meta") == "m1"]
    assert len(seen) == 1
    assert seen[0].metadata["x-meta-bin"] == b"\x00\xff"
    assert seen[0].time_remaining is not None
    assert 3 < seen[0].time_remaining <= 5


async def test_an_app_error_arrives_with_its_status_message_and_trailers(mesh: GrpcMesh) -> None:
    async with mesh.channel() as channel:
        call = channel.unary_unary(method("Echo"))(b"fail", timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.value.details() == "bad request ✓ 100%"
    assert dict(failed.value.trailing_metadata() or ())["x-why"] == "because"


async def test_server_streaming_with_flow_control(mesh: GrpcMesh) -> None:
    """8 MiB in 64 messages: more than every window on the way."""
    async with mesh.channel() as channel:
        got = [m async for m in channel.unary_stream(method("Count"))(b"64:131072", timeout=20)]
    assert len(got) == 64
    assert all(len(m) == 131072 for m in got)
    assert [m.split(b":")[0] for m in got] == [b"%d" % i for i in range(64)]


async def test_client_streaming(mesh: GrpcMesh) -> None:
    async def requests() -> AsyncIterator[bytes]:
        for i in range(40):
            yield os.urandom(100_000 + i)

    async with mesh.channel() as channel:
        answer = await channel.stream_unary(method("Sum"))(requests(), timeout=20)
    assert answer == b"40:%d" % sum(100_000 + i for i in range(40))


async def test_bidirectional_ping_pong_and_big_messages(mesh: GrpcMesh) -> None:
    async with mesh.channel() as channel:
        call = channel.stream_stream(method("Chat"))(timeout=20)
        # Each answer before the next request: the response streams while the request does.
        for i in range(20):
            await call.write(b"m%d" % i)
            assert await call.read() == b"re:m%d" % i
        big = os.urandom(2 * MIB)
        await call.write(big)
        assert await call.read() == b"re:" + big
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_a_client_using_the_sidecar_as_its_http_proxy(mesh: GrpcMesh) -> None:
    """gRPC honours ``http_proxy`` (the webhook sets it with natsmesh.io/proxy-env):
    the channel names the service itself and tunnels through a CONNECT, which
    the sidecar opens and reads as its own connection."""
    proxied = [*OPTIONS, ("grpc.http_proxy", f"http://127.0.0.1:{mesh.port()}")]
    async with grpc.aio.insecure_channel("orders.shop:80", options=proxied) as channel:
        assert await channel.unary_unary(method("Echo"))(b"proxied", timeout=5) == b"proxied"
        got = [m async for m in channel.unary_stream(method("Count"))(b"3:10", timeout=5)]
    assert [m[:2] for m in got] == [b"0:", b"1:", b"2:"]
    # A caller that may not call orders gets the same status through a proxy.
    served = sum(s.calls for s in mesh.states)
    evil = [*OPTIONS, ("grpc.http_proxy", f"http://127.0.0.1:{mesh.port('evil')}")]
    async with grpc.aio.insecure_channel("orders.shop:80", options=evil) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary(method("Echo"))(b"x", timeout=5)
    assert refused.value.code() in (
        grpc.StatusCode.PERMISSION_DENIED,  # refused inside the tunnel
        grpc.StatusCode.UNAVAILABLE,  # the tunnel refused: gRPC reports a failed connect
    ), refused.value
    assert sum(s.calls for s in mesh.states) == served


async def test_per_request_load_balancing_over_one_connection(mesh: GrpcMesh) -> None:
    """One channel (one HTTP/2 connection): the calls still spread over every replica."""
    mesh.reset()
    async with mesh.channel() as channel:
        who = channel.unary_unary(method("Who"))
        answers = [await who(b"", timeout=5) for _ in range(60)]
    spread = collections.Counter(answers)
    assert set(spread) == {b"r0", b"r1", b"r2"}, spread
    assert min(spread.values()) >= 5, spread


async def test_mesh_refusals_are_grpc_statuses(mesh: GrpcMesh) -> None:
    cases = [
        # evil may call nobody: its own sidecar refuses.
        ("evil", "orders.shop", grpc.StatusCode.PERMISSION_DENIED, "may not call"),
        ("web", "nobody.shop", grpc.StatusCode.UNIMPLEMENTED, "no service"),
        # ghost is known and allowed, but nothing serves it.
        ("web", "ghost.shop", grpc.StatusCode.UNAVAILABLE, "no instance"),
    ]
    for side, authority, code, text in cases:
        async with mesh.channel(side, authority) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(method("Echo"))(b"x", timeout=5)
        assert refused.value.code() == code, (side, authority, refused.value)
        assert text in (refused.value.details() or ""), refused.value.details()
    # The legitimate call beside them is served.
    async with mesh.channel() as channel:
        assert await channel.unary_unary(method("Echo"))(b"ok", timeout=5) == b"ok"


async def test_the_routes_timeout_is_a_deadline_and_cancels_the_app(mesh: GrpcMesh) -> None:
    """The route's 1 s for Slow is shorter than the client's 10 s deadline."""
    mesh.reset()
    started = time.monotonic()
    async with mesh.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await channel.unary_unary(method("Slow"))(b"", timeout=10)
    elapsed = time.monotonic() - started
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"{SLOW_TIMEOUT_MS} ms" in (late.value.details() or "")
    assert SLOW_TIMEOUT_MS / 1000 <= elapsed < 4
    await asyncio.wait_for(_any_cancelled(mesh), 3)


async def test_grpc_timeout_is_enforced_by_the_sidecar(mesh: GrpcMesh) -> None:
    """A raw HTTP/2 client that sends ``grpc-timeout: 300m`` and never gives
    up itself: the sidecar answers DEADLINE_EXCEEDED and cancels the app."""
    mesh.reset()
    started = time.monotonic()
    headers = await _raw_call(mesh.port(), method("Slow"), [("grpc-timeout", "300m")])
    elapsed = time.monotonic() - started
    assert headers[":status"] == "200"
    assert headers["grpc-status"] == "4", headers
    assert 0.3 <= elapsed < 0.9, elapsed
    await asyncio.wait_for(_any_cancelled(mesh), 3)


async def test_a_client_cancel_cancels_the_apps_call(mesh: GrpcMesh) -> None:
    mesh.reset()
    async with mesh.channel() as channel:
        call = channel.unary_stream(method("Ticks"))(b"", timeout=30)
        ticks = [await call.read() for _ in range(3)]
        assert ticks == [b"tick 0", b"tick 1", b"tick 2"]
        call.cancel()
        await asyncio.wait_for(_any_cancelled(mesh), 3)
        # The connection goes on serving.
        assert await channel.unary_unary(method("Echo"))(b"after", timeout=5) == b"after"


def _http1_error(req: urllib.request.Request) -> tuple[int, dict[str, str]]:
    """An HTTP/1.1 request the mesh refuses: its status and JSON error body."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(req, timeout=5)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    raise AssertionError("no error")


async def test_http1_still_served_on_the_same_listener(mesh: GrpcMesh) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{mesh.port()}/x", headers={"Host": "nobody.shop"}
    )
    status, body = await asyncio.to_thread(_http1_error, req)
    assert status == 404
    assert body["error"] == "unknown_service"


async def test_an_http1_caller_of_a_grpc_service_gets_415_and_the_app_nothing(
    mesh: GrpcMesh,
) -> None:
    """An HTTP/1.1 POST to a ``protocol: grpc`` service: its sidecar answers
    415 ``grpc_only`` (the caller's mistake, not a 502 counted against the
    callee) and no app sees it; the same method over gRPC is served."""
    mesh.reset()
    req = urllib.request.Request(
        f"http://127.0.0.1:{mesh.port()}{method('Echo')}",
        data=b"hello",
        headers={"Host": "orders.shop", "Content-Type": "application/json"},
        method="POST",
    )
    status, body = await asyncio.to_thread(_http1_error, req)
    assert status == 415, body
    assert body["error"] == "grpc_only"
    assert "gRPC client" in body["message"]
    assert sum(s.calls for s in mesh.states) == 0
    async with mesh.channel() as channel:
        assert await channel.unary_unary(method("Echo"))(b"hello", timeout=5) == b"hello"
    assert sum(s.calls for s in mesh.states) == 1


async def _any_cancelled(mesh: GrpcMesh) -> None:
    await asyncio.wait(
        [asyncio.ensure_future(s.cancelled.wait()) for s in mesh.states],
        return_when=asyncio.FIRST_COMPLETED,
    )


async def _raw_call(port: int, path: str, extra: list[tuple[str, str]]) -> dict[str, str]:
    """One gRPC request by hand (h2): the response's headers and trailers, merged."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(1, [*request_headers(path), *extra])
    conn.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
    writer.write(conn.data_to_send())
    got: dict[str, str] = {}
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "connection closed"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    got.update(dict(event.headers))  # type: ignore[arg-type]
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return got
            writer.write(conn.data_to_send())
    finally:
        writer.close()


async def test_what_only_looks_like_the_http2_preface_gets_an_http1_400(mesh: GrpcMesh) -> None:
    """Found by the fuzz test: ``PRI * HTTP/1.1`` with headers was taken for HTTP/2."""
    for data in (
        b"PRI * HTTP/1.1\r\nHost: orders\r\n\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.port())
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400 "), (data, answer[:60])


# -- policy: retries, the gRPC status as a label -----------------------------------------


async def test_unavailable_is_retried_where_the_route_says_so(mesh: GrpcMesh) -> None:
    """The first try is answered UNAVAILABLE (trailers-only); the route's
    ``retryOnGrpc: [UNAVAILABLE]`` sends the call again and the client sees OK."""
    mesh.reset()
    retries = await _retries(mesh)
    mesh.flaky.left = 1
    async with mesh.channel() as channel:
        answer = await channel.unary_unary(method("RetryRead"))(b"x", timeout=5)
    assert answer in {b"r0", b"r1", b"r2"}
    assert len(mesh.flaky.seen) == 2, mesh.flaky.seen  # the failed try and the retry
    assert mesh.flaky.left == 0
    assert await _retries(mesh) == retries + 1


async def test_a_method_not_opted_in_is_not_retried(mesh: GrpcMesh) -> None:
    """Write's rule has retries, but lists no gRPC status: the app sees one call."""
    mesh.reset()
    mesh.flaky.left = 1
    async with mesh.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await channel.unary_unary(method("Write"))(b"x", timeout=5)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "is shedding" in (failed.value.details() or "")
    assert len(mesh.flaky.seen) == 1, mesh.flaky.seen


async def test_a_client_stream_past_the_buffer_is_not_retried(mesh: GrpcMesh) -> None:
    """256 KiB of request (more than the 128 KiB the caller's sidecar holds)
    is not sent twice; 3 KiB under the same rule is."""

    async def messages(n: int, size: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield os.urandom(size)

    mesh.reset()
    mesh.flaky.left = 1
    async with mesh.channel() as channel:
        upload = channel.stream_unary(method("RetryUpload"))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await upload(messages(4, 64 * 1024), timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(mesh.flaky.seen) == 1, mesh.flaky.seen
        mesh.flaky.left = 1
        assert await upload(messages(3, 1024), timeout=10) == b"3072"
    assert len(mesh.flaky.seen) == 3, mesh.flaky.seen


async def test_metrics_count_the_grpc_status(mesh: GrpcMesh) -> None:
    """Both sidecars label a gRPC call with the status its client got (an app's
    error is an HTTP 200); an HTTP call's series has no such label."""
    mesh.reset()
    mesh.flaky.left = 1
    async with mesh.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(method("Write"))(b"x", timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(method("Echo"))(b"fail", timeout=5)
        assert await channel.unary_unary(method("Echo"))(b"ok", timeout=5) == b"ok"
    async with mesh.channel(authority="ghost.shop") as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(method("Echo"))(b"x", timeout=5)
    await test_http1_still_served_on_the_same_listener(mesh)
    web = await _samples(mesh, "web")
    out = {
        (lab["destination"], lab["status"], lab.get("grpc_status"))
        for name, lab, _ in web
        if name == "natsmesh_sidecar_requests_total" and lab["direction"] == "outbound"
    }
    assert ("orders.shop", "200", "14") in out, out  # the app's UNAVAILABLE
    assert ("orders.shop", "200", "3") in out, out  # INVALID_ARGUMENT
    assert ("orders.shop", "200", "0") in out, out
    assert ("ghost.shop", "503", "14") in out, out  # the mesh's: no responders
    assert ("-", "404", None) in out, out  # HTTP/1.1: no grpc_status
    inbound: collections.Counter[str] = collections.Counter()
    for i in range(3):
        for name, lab, value in await _samples(mesh, f"orders-{i}"):
            if name == "natsmesh_sidecar_requests_total" and lab["direction"] == "inbound":
                inbound[lab.get("grpc_status", "")] += int(value)
    assert inbound["14"] >= 1, inbound
    assert inbound["3"] >= 1, inbound
    assert inbound["0"] >= 1, inbound


async def _samples(mesh: GrpcMesh, side: str) -> list[tuple[str, dict[str, str], float]]:
    """A sidecar's /metrics, parsed: (name, labels, value) per sample."""
    text = (await request(mesh.sides[side].admin_port, "GET", "/metrics")).body.decode()
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        out.append((name, labels, float(value)))
    return out


async def _retries(mesh: GrpcMesh) -> float:
    for name, labels, value in await _samples(mesh, "web"):
        if name == "natsmesh_sidecar_retries_total" and labels["destination"] == "orders.shop":
            return value
    return 0.0
