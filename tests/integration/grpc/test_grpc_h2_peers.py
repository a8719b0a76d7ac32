"""HTTP/2 as grpc-go speaks it, through two sidecars.

Found running a grpc-go client and server through the mesh, reproduced here
by hand with ``h2`` (a Go build would cost CI a minute):

* grpc-go's BDP estimator grows its receive windows with a connection
  WINDOW_UPDATE and then a SETTINGS frame raising ``INITIAL_WINDOW_SIZE``,
  which moves every open stream's window with no WINDOW_UPDATE of its own
  (RFC 9113, 6.9.2). When the two came in separate reads, a sidecar that
  resumed a stream only on WINDOW_UPDATE held its DATA for ever: a client
  of web's outbound listener and an app behind orders' sidecar that open
  windows by SETTINGS only.
* A grpc-go server with ``MaxConnectionAge`` (or in ``GracefulStop``)
  sends GOAWAY and a PING, then finishes the calls it took: h2 took the
  GOAWAY for the connection's end and the PING for a protocol error, and
  every call in flight to the app was cut.
* The same from a client: an HTTP/2 client that closes its connection
  gracefully says GOAWAY (NO_ERROR) and still reads the answers of the
  calls it has open; web's sidecar closed the connection at once.
"""

from __future__ import annotations

import asyncio
import collections
import struct
from collections.abc import AsyncIterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import pytest_asyncio
from hyperframe.frame import GoAwayFrame, PingFrame

from natsmesh_sidecar.edge.h2app import send_within_window
from tests.fixtures.nats_operator import start_operator_nats
from tests.integration.grpc.grpc_harness import GrpcMesh, request_headers, running_grpc_mesh

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

#: The windows both hand-made ends start with: far below the messages sent.
SMALL = 1000
RAISED = 1_000_000
BIG = 200_000
WINDOW = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
#: What ``/raw.Test/GoAway`` answers, its GOAWAY after the first DATA frame.
GOAWAY_BODY = b"\x00" + struct.pack(">I", 40_000) + b"g" * 40_000
#: How long ``/raw.Test/Late`` takes to answer.
LATE = 0.5


def text(headers: Any) -> dict[str, str]:
    return {bytes(n).decode(): bytes(v).decode() for n, v in headers or ()}


def grpc_frame(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


async def raise_when_quiet(got: list[int], send: asyncio.Event) -> None:
    """Set ``send`` once bytes came and then nothing for a while: the peer
    used up the small window and waits."""
    last = -1
    while last != got[0] or not got[0]:
        last = got[0]
        await asyncio.sleep(0.3)
    send.set()


class RawApp(asyncio.Protocol):
    """A gRPC server by hand, its streams' window ``SMALL``.

    ``/raw.Test/Upload``: once the request stalls on that window, SETTINGS
    raise it (and nothing else does); the answer is the request's length.
    ``/raw.Test/Download``: the answer is a ``BIG`` message.
    ``/raw.Test/GoAway``: ``GOAWAY_BODY``, with grpc-go's graceful GOAWAY
    after its first DATA frame, and the connection closed after it.
    ``/raw.Test/Late``: the request's length, answered after ``LATE`` seconds.
    """

    def __init__(self) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.conn.local_settings = h2.settings.Settings(
            client=False, initial_values={WINDOW: SMALL}
        )
        self.transport: asyncio.Transport | None = None
        self.paths: dict[int, str] = {}
        self.got: dict[int, list[int]] = {}
        self.tasks: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        # Only the streams' windows are small, not the connection's.
        self.conn.increment_flow_control_window(10 * RAISED)
        self._send()

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                path = text(event.headers)[":path"]
                self.paths[event.stream_id] = path
                got = self.got[event.stream_id] = [0]
                if path.endswith("/Upload"):
                    self.tasks.add(asyncio.ensure_future(self._raise(got)))
            elif isinstance(event, h2.events.DataReceived):
                # Never acknowledged: only SETTINGS open the window.
                self.got[event.stream_id][0] += len(event.data)
            elif isinstance(event, h2.events.StreamEnded):
                if self.paths[event.stream_id].endswith("/Late"):
                    asyncio.get_running_loop().call_later(LATE, self._late, event.stream_id)
                else:
                    self._answer(event.stream_id)
        self._send()

    def _late(self, sid: int) -> None:
        self._answer(sid)
        self._send()

    async def _raise(self, got: list[int]) -> None:
        quiet = asyncio.Event()
        await raise_when_quiet(got, quiet)
        self.conn.update_settings({WINDOW: RAISED})
        self._send()

    def _answer(self, sid: int) -> None:
        path = self.paths.pop(sid, "")
        got = self.got.pop(sid)[0]
        if path.endswith("/Download"):
            body = grpc_frame(b"d" * BIG)
        elif path.endswith("/GoAway"):
            body = GOAWAY_BODY
        else:
            body = grpc_frame(str(got).encode())
            self.conn.update_settings({WINDOW: SMALL})  # for the next upload
        self.conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        step = self.conn.max_outbound_frame_size
        for i in range(0, len(body), step):
            if path.endswith("/GoAway") and i == step:
                self._go_away()
            self.conn.send_data(sid, body[i : i + step])
        self.conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
        if path.endswith("/GoAway"):
            # grpc-go's second GOAWAY names the last stream it took; then it closes.
            self._send()
            assert self.transport is not None
            self.transport.write(GoAwayFrame(0, last_stream_id=sid).serialize())
            self.transport.close()

    def _go_away(self) -> None:
        """grpc-go's graceful GOAWAY mid-response (bypassing our h2, which
        would refuse to send anything after it): "no new streams", and a PING."""
        self._send()
        assert self.transport is not None
        self.transport.write(
            GoAwayFrame(0, last_stream_id=2**31 - 1).serialize()
            + PingFrame(0, opaque_data=b"graceful").serialize()
        )

    def _send(self) -> None:
        if self.transport is not None:
            self.transport.write(self.conn.data_to_send())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GrpcMesh]:
    workdir = tmp_path_factory.mktemp("grpcwin")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawApp, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    on = start_operator_nats(workdir)
    try:
        async with running_grpc_mesh(on, workdir, app_ports=[port]) as m:
            yield m
    finally:
        on.server.stop()
        server.close()


async def call(
    port: int, path: str, body: bytes, *, window: int = RAISED
) -> tuple[bytes, dict[str, str]]:
    """One gRPC call by hand on a new connection whose streams' window is
    ``window``, raised to ``RAISED`` by SETTINGS only once the response
    stalls on it: (the response body, its trailers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.local_settings = h2.settings.Settings(client=True, initial_values={WINDOW: window})
    conn.initiate_connection()
    conn.increment_flow_control_window(10 * RAISED)
    conn.send_headers(1, request_headers(path))
    out = collections.deque([body])
    ended = False
    got, answer = [0], bytearray()
    trailers: dict[str, str] = {}
    quiet = asyncio.Event()
    watcher = asyncio.ensure_future(raise_when_quiet(got, quiet))
    raised = window >= RAISED
    try:
        while True:
            if not ended:
                # The request within the sidecar's windows.
                send_within_window(conn, 1, out)
                if not out:
                    conn.end_stream(1)
                    ended = True
                writer.write(conn.data_to_send())
            if quiet.is_set() and not raised:
                raised = True
                conn.update_settings({WINDOW: RAISED})
                writer.write(conn.data_to_send())
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.1)
            except TimeoutError:
                continue
            assert data, "connection closed"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    got[0] += len(event.data)  # never acknowledged
                    answer += event.data
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = text(event.headers)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return bytes(answer), trailers
            writer.write(conn.data_to_send())
    finally:
        watcher.cancel()
        writer.close()


async def test_a_response_resumes_when_the_client_raises_its_window_by_settings(
    mesh: GrpcMesh,
) -> None:
    """web's sidecar holds the response past the client's 1000-byte window,
    then sends the rest once SETTINGS raise it (before the fix: never)."""
    got, trailers = await asyncio.wait_for(
        call(mesh.port(), "/raw.Test/Download", grpc_frame(b"go"), window=SMALL), 10
    )
    assert got == grpc_frame(b"d" * BIG)
    assert trailers.get("grpc-status") == "0"


async def test_a_request_resumes_when_the_app_raises_its_window_by_settings(
    mesh: GrpcMesh,
) -> None:
    """orders' sidecar holds the request past the app's 1000-byte window,
    then sends the rest once the app's SETTINGS raise it (before the fix: never)."""
    body = grpc_frame(b"u" * BIG)
    got, trailers = await asyncio.wait_for(call(mesh.port(), "/raw.Test/Upload", body), 10)
    assert trailers.get("grpc-status") == "0"
    # The app's answer: every request byte reached it.
    assert got == grpc_frame(str(len(body)).encode())


async def test_a_call_in_flight_survives_the_apps_graceful_goaway(mesh: GrpcMesh) -> None:
    """The app says GOAWAY (and PINGs) mid-response: that call completes, and
    the next goes on a new connection (before the fix: UNAVAILABLE, cut)."""
    got, trailers = await asyncio.wait_for(
        call(mesh.port(), "/raw.Test/GoAway", grpc_frame(b"go")), 10
    )
    assert trailers.get("grpc-status") == "0", trailers
    assert got == GOAWAY_BODY
    got, trailers = await asyncio.wait_for(
        call(mesh.port(), "/raw.Test/Download", grpc_frame(b"go")), 10
    )
    assert trailers.get("grpc-status") == "0", trailers
    assert got == grpc_frame(b"d" * BIG)


async def test_a_clients_graceful_goaway_lets_its_open_call_finish(mesh: GrpcMesh) -> None:
    """The client sends its request, then GOAWAY (NO_ERROR: "I open nothing
    more"), as an HTTP/2 client closing a connection gracefully does: it
    still gets the answer, then web's sidecar closes the connection (before
    the fix: closed at the GOAWAY, the call cut)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.port())
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    body = grpc_frame(b"late")
    conn.send_headers(1, request_headers("/raw.Test/Late"))
    conn.send_data(1, body, end_stream=True)
    writer.write(conn.data_to_send())
    await writer.drain()
    writer.write(GoAwayFrame(0, last_stream_id=0).serialize())
    answer, trailers, ended = bytearray(), {}, False
    try:
        async with asyncio.timeout(10):
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        answer += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, 1)
                    elif isinstance(event, h2.events.TrailersReceived):
                        trailers = text(event.headers)
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
                writer.write(conn.data_to_send())
    finally:
        writer.close()
    assert ended, "the call was cut"
    assert trailers.get("grpc-status") == "0", trailers
    assert bytes(answer) == grpc_frame(str(len(body)).encode())
