"""WebSocket through two sidecars: a ``websockets`` client, an aiohttp app.

One mesh for the module (an operator-mode nats-server, the tenant applied
by the operator's wiring code, three sidecar processes): its start is most
of the time these tests take. The client connects to web's outbound
listener naming ``orders.shop`` (Host header, or the absolute URI a proxy
client sends); the sidecars relay bytes and never parse a frame, so what is
checked here is what the two real WebSocket implementations see of each
other: messages both ways, a large one, ping/pong, the close handshake with
its code and reason, and the ends: a refused upgrade, a forbidden caller, a
callee sidecar killed, a client gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close
from websockets.uri import parse_uri

from bench.sidecar import rss_mb
from tests.fixtures.nats_operator import start_operator_nats
from tests.integration.stream.ws_harness import WsMesh, connect_via, echo_once, running_ws_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

MIB = 1024 * 1024
IDLE_TIMEOUT_S = 2.0
#: A sidecar's death must reach the other end within this: a quarter of the
#: idle timeout, a beat answered "no responders", then slack for a busy box.
CUT_WITHIN_S = 3.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WsMesh]:
    workdir = tmp_path_factory.mktemp("ws")
    on = start_operator_nats(workdir)
    try:
        async with running_ws_mesh(on, workdir, NATSMESH_STREAM_IDLE_TIMEOUT_SECONDS="2") as m:
            yield m
    finally:
        on.server.stop()


async def test_text_and_binary_echo_and_a_4mib_message(mesh: WsMesh) -> None:
    async with connect_via(mesh.port(), "/echo", max_size=None) as ws:
        assert await echo_once(ws, "hello") == "hello"
        assert await echo_once(ws, "héllo ✓") == "héllo ✓"
        assert await echo_once(ws, b"\x00\x01\xff") == b"\x00\x01\xff"
        big = os.urandom(4 * MIB)
        assert await echo_once(ws, big) == big
        # Many small messages in flight at once arrive in order.
        for i in range(200):
            await ws.send(f"m{i}")
        got = [await asyncio.wait_for(ws.recv(), 5) for _ in range(200)]
        assert got == [f"m{i}" for i in range(200)]
    # What the app saw of the upgrade: the client's own WebSocket headers.
    assert mesh.state.last_headers["Sec-WebSocket-Version"] == "13"
    assert "Sec-WebSocket-Key" in mesh.state.last_headers


async def test_ping_pong_both_ways(mesh: WsMesh) -> None:
    async with connect_via(mesh.port(), "/ping") as ws:
        # The app pinged first; the client's library answered with a pong.
        assert await asyncio.wait_for(ws.recv(), 5) == "pong:from-app"
        # The client pings; the app pongs (the waiter resolves on the pong).
        latency = await asyncio.wait_for(await ws.ping(b"from-client"), 5)
        assert latency >= 0


async def test_close_handshake_carries_code_and_reason_both_ways(mesh: WsMesh) -> None:
    # The client closes: the app sees the client's code.
    mesh.state.ended.clear()
    async with connect_via(mesh.port(), "/echo") as ws:
        assert await echo_once(ws, "x") == "x"
        await ws.close(code=4000, reason="client done")
        assert ws.protocol.close_rcvd is not None  # the app answered the close frame
    await asyncio.wait_for(mesh.state.ended.wait(), 5)
    assert mesh.state.closes[-1] == (4000, "client done")
    # The app closes: the client sees the app's code and reason.
    async with connect_via(mesh.port(), "/echo") as ws:
        await ws.send("close 4001 app says bye")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd == Close(4001, "app says bye")


async def test_proxy_form_upgrade(mesh: WsMesh) -> None:
    """An HTTP proxy client's absolute URI: the websockets protocol, over a raw socket."""
    client = ClientProtocol(parse_uri("ws://orders.shop/echo"))
    request = client.connect()
    request.path = "http://orders.shop/echo"
    client.send_request(request)
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.port())
    try:

        async def exchange() -> Sequence[object]:
            for data in client.data_to_send():
                writer.write(data)
            await writer.drain()
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), 5)
                assert chunk, "connection closed"
                client.receive_data(chunk)
                events = client.events_received()
                if events:
                    return events

        events = await exchange()
        assert getattr(events[0], "status_code", None) == 101
        client.send_text(b"via proxy form")
        events = await exchange()
        assert getattr(events[0], "data", None) == b"via proxy form"
    finally:
        writer.close()


async def test_a_caller_without_permission_gets_403_at_the_upgrade(mesh: WsMesh) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect_via(mesh.port("evil"), "/echo"):
            pass
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body or b"{}")["error"] == "forbidden"
    # The legitimate caller beside it is served.
    async with connect_via(mesh.port(), "/echo") as ws:
        assert await echo_once(ws, "still fine") == "still fine"


async def test_the_route_and_its_version_split_apply_at_the_upgrade(mesh: WsMesh) -> None:
    canary = {"x-canary": "1"}
    async with connect_via(mesh.port(), "/echo", additional_headers=canary) as ws:
        assert await echo_once(ws, "to v2") == "to v2"
        assert mesh.states["v2"].open == 1
        assert mesh.states["v1"].open == 0
    async with connect_via(mesh.port(), "/echo") as ws:
        assert await echo_once(ws, "to v1") == "to v1"
        assert mesh.states["v1"].open == 1
        assert mesh.states["v2"].open == 0


async def test_an_unknown_route_and_other_upgrades_are_refused(mesh: WsMesh) -> None:
    with pytest.raises(InvalidStatus) as unknown:
        async with connect_via(mesh.port(), "/echo", host="nobody.shop"):
            pass
    assert unknown.value.response.status_code == 404
    upgrade = b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    for head, code in (
        (
            b"GET / HTTP/1.1\r\nHost: orders.shop\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            "upgrade_not_supported",
        ),
        (
            b"POST /echo HTTP/1.1\r\nHost: orders.shop\r\n" + upgrade + b"\r\n",
            "upgrade_not_supported",
        ),
        (
            b"GET http://[x/echo HTTP/1.1\r\nHost: orders.shop\r\n" + upgrade + b"\r\n",
            "bad_request",
        ),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.port())
        writer.write(head)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        status, _, body = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 400 "), answer
        assert json.loads(body)["error"] == code, answer


async def raw_connect(port: int, target: bytes, then: bytes = b"") -> bytes:
    """A CONNECT to ``target`` on a sidecar's listener, ``then`` inside; all it answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n" + then)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_clients_using_the_sidecar_as_their_proxy_connect_to_mesh_services(
    mesh: WsMesh, tmp_path: Path
) -> None:
    """A client told to use the sidecar as its proxy (HTTP_PROXY, which the
    websockets package and gRPC honour) opens a CONNECT tunnel: the sidecar
    answers it and parses what comes inside as its own connection."""
    proxy = f"http://127.0.0.1:{mesh.port()}"
    async with connect("ws://orders.shop/echo", proxy=proxy, open_timeout=5) as ws:
        assert await echo_once(ws, "through CONNECT") == "through CONNECT"
    # curl -p: plain HTTP inside the tunnel, the app's own answer comes back.
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-p", "-x", proxy, "-D", "-", "-o", str(tmp_path / "body"),
        "http://orders.shop/refuse",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err
    assert b"HTTP/1.1 200 Connection established" in out
    assert b"HTTP/1.1 401" in out, out
    assert b"x-refused: yes" in out.lower(), out
    # A tunnel grants nothing: evil's request inside is refused as outside,
    # and never reaches the app (whose answer would be its 401). The tunnel
    # itself may be refused at once, if evil's sidecar already knows.
    inside = b"GET /refuse HTTP/1.1\r\nHost: orders.shop\r\nConnection: close\r\n\r\n"
    answer = await raw_connect(mesh.port("evil"), b"orders.shop:80", inside)
    assert b"HTTP/1.1 403 " in answer, answer
    assert b'"forbidden"' in answer, answer
    # (The app's answer by its status line and header: a bare "401" can be in
    # the refusal's random request id.)
    assert b"HTTP/1.1 401" not in answer, answer
    assert b"x-refused" not in answer.lower(), answer
    # Refused where no request inside could succeed, with the mesh's JSON error.
    for port, target, status, code in (
        (mesh.port(), b"example.com:443", 404, "unknown_service"),
        (mesh.port(), b"orders.shop", 400, "bad_request"),
    ):
        answer = await raw_connect(port, target)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), answer
        assert json.loads(body)["error"] == code, answer
    # TLS inside (an https:// URL through the proxy) is not carried: closed.
    hello = b"\x16\x03\x01\x00\x05hello"
    answer = await raw_connect(mesh.port(), b"orders.shop:443", hello)
    assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n", answer


async def test_the_app_refusing_the_upgrade_is_relayed(mesh: WsMesh) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect_via(mesh.port(), "/refuse"):
            pass
    response = refused.value.response
    assert response.status_code == 401
    assert response.headers["x-refused"] == "yes"
    assert json.loads(response.body or b"{}") == {"error": "no token"}


async def test_a_client_going_away_closes_the_apps_socket(mesh: WsMesh) -> None:
    mesh.state.ended.clear()
    before = len(mesh.state.closes)
    ws = await connect_via(mesh.port(), "/echo")
    assert await echo_once(ws, "x") == "x"
    # No close frame: the client's TCP connection just goes.
    ws.transport.abort()
    await asyncio.wait_for(mesh.state.ended.wait(), CUT_WITHIN_S)
    assert len(mesh.state.closes) == before + 1
    assert mesh.state.closes[-1][0] is None, mesh.state.closes[-1]


async def test_idle_sockets_cost_little_memory_and_outlive_the_idle_timeout(
    mesh: WsMesh,
) -> None:
    """200 open idle sockets; each sidecar's growth per socket stays under a bound.

    Both ends hold a socket, its protocol object, a sender and a receiver of
    the two streams, and an inbox entry (caller) or a NATS subscription
    (callee): a few KB. 16 KB per socket puts 1,000 sockets within the
    sidecar's +16 MB budget for what it carries. Quiet for longer than the
    stream idle timeout, they stay open: the sidecars' beats keep them. Once
    closed, nothing of them is left on the server (the callee's
    subscriptions to their call subjects are gone).
    """
    n = 200
    sides = [mesh.sides["web"].pid, mesh.sides["orders"].pid]
    # Warm up (first allocations of each kind, pools), then the baseline.
    warm = [await connect_via(mesh.port(), "/echo") for _ in range(20)]
    for ws in warm:
        await ws.close()
    await asyncio.sleep(0.3)
    base = {pid: rss_mb(pid) for pid in sides}
    sockets = []
    try:
        for _ in range(n // 20):
            sockets += await asyncio.gather(*(_open(mesh) for _ in range(20)))
        assert await echo_once(sockets[-1], "alive") == "alive"
        await asyncio.sleep(0.5)
        per_socket_kb = {pid: (rss_mb(pid) - base[pid]) * 1024 / n for pid in sides}
        assert call_subscriptions(mesh) == n
        # Past the idle timeout (2 s) without a message: still open both ways.
        await asyncio.sleep(IDLE_TIMEOUT_S * 1.3)
        for ws in (sockets[0], sockets[n // 2], sockets[-1]):
            assert await echo_once(ws, "still here") == "still here"
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))
    print(f"RSS per idle socket, caller / callee: {per_socket_kb} KB")
    assert all(kb < 16 for kb in per_socket_kb.values()), per_socket_kb
    for _ in range(30):  # their unsubscribes reach the server within 3 s
        if not call_subscriptions(mesh):
            break
        await asyncio.sleep(0.1)
    assert call_subscriptions(mesh) == 0


def call_subscriptions(mesh: WsMesh) -> int:
    """The callee's subscriptions to call subjects, as the server counts them."""
    url = f"{mesh.on.server.monitor_url}/connz?subs=1&limit=1024"
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - the test's own server
        connz = json.load(r)
    return sum(
        1
        for c in connz["connections"]
        for sub in c.get("subscriptions_list") or ()
        if sub.startswith("mesh._shop.orders.")
    )


async def _open(mesh: WsMesh) -> ClientConnection:
    return await connect_via(mesh.port(), "/echo")


async def test_callee_sidecar_killed_cuts_the_client_within_a_bound(mesh: WsMesh) -> None:
    async with connect_via(mesh.port(), "/echo") as ws:
        assert await echo_once(ws, "x") == "x"
        mesh.sides["orders"].proc.kill()
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), CUT_WITHIN_S + 2)
        assert time.monotonic() - t0 < CUT_WITHIN_S
    await mesh.restart("orders")
    async with connect_via(mesh.port(), "/echo") as ws:
        assert await echo_once(ws, "after the restart") == "after the restart"


async def test_caller_sidecar_killed_closes_the_apps_socket_within_a_bound(mesh: WsMesh) -> None:
    mesh.state.ended.clear()
    async with connect_via(mesh.port(), "/echo") as ws:
        assert await echo_once(ws, "x") == "x"
        mesh.sides["web"].proc.kill()
        t0 = time.monotonic()
        await asyncio.wait_for(mesh.state.ended.wait(), CUT_WITHIN_S + 2)
        assert time.monotonic() - t0 < CUT_WITHIN_S
        assert mesh.state.closes[-1][0] is None  # no close frame: the connection was cut
    await mesh.restart("web")


async def test_nats_server_dying_cuts_both_ends(mesh: WsMesh) -> None:
    """Last: the mesh's server goes away, and comes back for nothing after."""
    mesh.state.ended.clear()
    async with connect_via(mesh.port(), "/echo") as ws:
        assert await echo_once(ws, "x") == "x"
        mesh.on.server.stop()
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), CUT_WITHIN_S + 2)
        await asyncio.wait_for(mesh.state.ended.wait(), CUT_WITHIN_S + 2)
        assert time.monotonic() - t0 < CUT_WITHIN_S
