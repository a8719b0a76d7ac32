"""The hot NATS path: header encoding/parsing and the nats-py internals it relies on."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from nats.aio.client import Client
from nats.aio.transport import TcpTransport
from nats.protocol import parser

from natsmesh_sidecar.transport import natsfast

pytestmark = pytest.mark.unit


async def test_nats_py_internals_still_exist() -> None:
    """natsfast hooks these private parts of nats-py (pinned); fail loudly if they move."""
    nc = Client()
    for attr in ("_pending", "_pending_data_size", "_flush_queue", "_max_pending_size", "stats"):
        assert hasattr(nc, attr), attr
    sig = inspect.signature(Client._process_msg)
    assert list(sig.parameters) == ["self", "sid", "subject", "reply", "data", "headers"]
    assert "self.nc._process_msg(" in inspect.getsource(parser.Parser.parse)
    assert "self._flush_queue.get()" in inspect.getsource(Client._flusher)
    assert parser.AWAITING_CONTROL_LINE == natsfast._AWAITING_CONTROL_LINE
    ps = nc._ps
    assert isinstance(ps.buf, bytearray)
    assert ps.state == parser.AWAITING_CONTROL_LINE
    assert "await self._ps.parse(" in inspect.getsource(Client._read_loop)
    # The reader hook and the direct flush: TcpTransport's streams, StreamReader's state.
    tcp = TcpTransport()  # type: ignore[no-untyped-call]
    assert hasattr(tcp, "_io_reader")
    assert hasattr(tcp, "_io_writer")
    assert "self._io_reader.read(" in inspect.getsource(TcpTransport.read)
    reader = asyncio.StreamReader()
    assert reader._waiter is None  # type: ignore[attr-defined]
    assert reader._buffer == bytearray()  # type: ignore[attr-defined]
    assert "reader.feed_data(data)" in inspect.getsource(asyncio.StreamReaderProtocol.data_received)


def test_headers_round_trip_like_nats_py() -> None:
    hdrs = {
        "Nm-Method": "PUT",
        "Nm-Target": "/a?b=c d",
        "X-Custom": "a b  c",
        "X-Latin": "\xe9\xff",  # HTTP bytes decoded as latin-1 survive as text
        "Nm-Dup-1-Accept": "c/d",
    }
    raw = natsfast.encode_headers(hdrs)
    assert raw.startswith(b"NATS/1.0\r\n")
    assert raw.endswith(b"\r\n\r\n")
    assert natsfast.parse_headers(raw) == hdrs
    assert Client._parse_header_lines(raw[len(b"NATS/1.0\r\n") :]) == hdrs


def test_newlines_in_values_cannot_inject_headers() -> None:
    raw = natsfast.encode_headers({"X-A": "1\r\nNm-Status: 200", "X-B": "2\n3"})
    assert natsfast.parse_headers(raw) == {"X-A": "1  Nm-Status: 200", "X-B": "2 3"}


def test_status_line_and_garbage() -> None:
    assert natsfast.parse_headers(b"NATS/1.0 503\r\n\r\n") == {"Status": "503"}
    assert natsfast.parse_headers(b"NATS/1.0 408 Request Timeout\r\nA: b\r\n\r\n") == {
        "Status": "408",
        "Description": "Request Timeout",
        "A": "b",
    }
    assert natsfast.parse_headers(b"") == {}
    # Lines without a colon, non-ASCII names and names with spaces are skipped.
    got = natsfast.parse_headers(
        b"NATS/1.0\r\nnocolon\r\n\xff\xfe: x\r\nA B: y\r\nOk: \xff\r\n\r\n"
    )
    assert got == {"Ok": "\ufffd"}


def test_violation_subject() -> None:
    text = 'nats: Permissions Violation for Publish to "mesh.shop.payments.v1"'
    assert natsfast.violation_subject(text) == ("publish", "mesh.shop.payments.v1")
    sub = 'nats: permissions violation for subscription to "_INBOX.x.>"'
    assert natsfast.violation_subject(sub) == ("subscription", "_INBOX.x.>")
    assert natsfast.violation_subject("nats: Maximum Payload Violation") is None
    assert natsfast.violation_subject("Permissions Violation for Publish to nothing") is None


class _FakeClient:
    """Just what nats-py's Parser and FastPath touch; records what reaches nats-py."""

    def __init__(self, log: list[tuple[object, ...]]) -> None:
        self.log = log
        self.stats = {"in_msgs": 0, "in_bytes": 0}
        self._ps = parser.Parser(self)

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        self.log.append(("msg", sid, bytes(subject), bytes(reply), bytes(data), headers))

    async def _process_ping(self) -> None:
        self.log.append(("ping",))

    async def _process_pong(self) -> None:
        self.log.append(("pong",))

    async def _process_info(self, info: object) -> None:
        self.log.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.log.append(("err", err))


_HDR = b"NATS/1.0\r\nNm-Status: 200\r\n\r\n"
STREAM = (
    b"HMSG mesh.a 2 _INBOX.r.1 %d %d\r\n%sbody\r\n" % (len(_HDR), len(_HDR) + 4, _HDR)
    + b"PING\r\n"
    + b"MSG other 9 5\r\nhello\r\n"
    + b"MSG mesh.a 2 re.ply 3\r\nabc\r\n"
    + b"+OK\r\n"
    + b'INFO {"server_id":"x"}\r\n'
    + b"HMSG other 9 %d %d\r\n%s\r\n" % (len(_HDR), len(_HDR), _HDR)
    + b"MSG  mesh.a\t2   0\r\n\r\n"
    + b"-ERR 'Permissions Violation for Publish to \"x\"'\r\n"
    + b"HMSG mesh.a 2 r %d %d\r\n%sxy\r\n" % (len(_HDR), len(_HDR) + 2, _HDR)
)


async def _feed(chunks: list[bytes]) -> list[tuple[object, ...]]:
    log: list[tuple[object, ...]] = []
    nc = _FakeClient(log)
    fast = natsfast.FastPath(nc)

    def handler(msg: natsfast.Reply) -> None:
        log.append(("fast", msg.subject, msg.reply, msg.data, msg.headers))

    fast.handlers[2] = handler
    for chunk in chunks:
        await nc._ps.parse(chunk)
    return log


async def _reference(chunks: list[bytes]) -> list[tuple[object, ...]]:
    """nats-py's parser alone, with sid 2 mapped as FastPath maps it."""
    log: list[tuple[object, ...]] = []
    nc = _FakeClient(log)
    for chunk in chunks:
        await nc._ps.parse(chunk)
    out: list[tuple[object, ...]] = []
    for entry in log:
        if entry[0] == "msg" and entry[1] == 2:
            _, _, subject, reply, data, headers = entry
            assert isinstance(subject, bytes)
            assert isinstance(reply, bytes)
            hdrs = natsfast.parse_headers(headers if isinstance(headers, bytes) else b"")
            out.append(("fast", subject.decode(), reply.decode(), data, hdrs))
        else:
            out.append(entry)
    return out


async def test_fast_frame_split_matches_nats_py_at_every_cut() -> None:
    """Whatever the reads cut, the same messages arrive in the same order as with nats-py."""
    expected = await _reference([STREAM])
    assert [e[0] for e in expected].count("fast") == 4
    assert await _feed([STREAM]) == expected
    for cut in range(1, len(STREAM)):
        assert await _feed([STREAM[:cut], STREAM[cut:]]) == expected, cut
    assert await _feed([STREAM[i : i + 1] for i in range(len(STREAM))]) == expected
    assert await _feed([STREAM[i : i + 7] for i in range(0, len(STREAM), 7)]) == expected


class _Transport:
    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._io_reader = reader


async def _feed_reader(chunks: list[bytes], yields: list[bool]) -> list[tuple[object, ...]]:
    """Chunks as they arrive on the socket, read by a loop like nats-py's ``_read_loop``.

    ``yields[i]`` lets the read loop run (and park again) after chunk i; without
    it the next chunk arrives while the loop has not read the previous one.
    """
    log: list[tuple[object, ...]] = []
    nc = _FakeClient(log)
    reader = asyncio.StreamReader()
    nc._transport = _Transport(reader)  # type: ignore[attr-defined]
    fast = natsfast.FastPath(nc)

    def handler(msg: natsfast.Reply) -> None:
        log.append(("fast", msg.subject, msg.reply, msg.data, msg.headers))

    fast.handlers[2] = handler

    async def read_loop() -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            await nc._ps.parse(data)

    loop_task = asyncio.get_running_loop().create_task(read_loop())
    # nats-py's first read (INFO) goes through the read loop, which hooks the reader.
    reader.feed_data(b"PING\r\n")
    for _ in range(3):
        await asyncio.sleep(0)
    for chunk, yield_after in zip(chunks, yields, strict=True):
        reader.feed_data(chunk)
        if yield_after:
            for _ in range(3):
                await asyncio.sleep(0)
    reader.feed_eof()
    await loop_task
    return log


async def test_reader_hook_keeps_the_stream_order_at_every_cut() -> None:
    """Frames handled as they arrive, or left to the read loop: the same messages, in order."""
    expected = [("ping",), *await _reference([STREAM])]
    for cut in range(1, len(STREAM)):
        chunks = [STREAM[:cut], STREAM[cut:]]
        for yields in ([True, True], [False, True]):
            assert await _feed_reader(chunks, yields) == expected, (cut, yields)
    singles = [STREAM[i : i + 1] for i in range(len(STREAM))]
    for pattern in (True, False):
        yields = [pattern or i % 3 == 0 for i in range(len(singles))]
        assert await _feed_reader(singles, yields) == expected
    # Only our frames, whole: all of them handled straight from the reader.
    ours = b"".join(
        b"HMSG mesh.a 2 r %d %d\r\n%sxy\r\n" % (len(_HDR), len(_HDR) + 2, _HDR) for _ in range(3)
    )
    log = await _feed_reader([ours], [True])
    assert [e[0] for e in log] == ["ping", "fast", "fast", "fast"]


async def test_reader_hook_handles_whole_frames_as_they_arrive() -> None:
    """No read-loop hop: our frames are dispatched inside feed_data, nothing is buffered."""
    log: list[tuple[object, ...]] = []
    nc = _FakeClient(log)
    reader = asyncio.StreamReader()
    nc._transport = _Transport(reader)  # type: ignore[attr-defined]
    fast = natsfast.FastPath(nc)
    fast.handlers[2] = lambda msg: log.append(("fast", msg.data))

    async def read_loop() -> None:
        while data := await reader.read(65536):
            await nc._ps.parse(data)

    task = asyncio.get_running_loop().create_task(read_loop())
    reader.feed_data(b"PING\r\n")
    for _ in range(3):
        await asyncio.sleep(0)
    frame = b"HMSG mesh.a 2 r %d %d\r\n%sxy\r\n" % (len(_HDR), len(_HDR) + 2, _HDR)
    reader.feed_data(frame * 2)
    assert log == [("ping",), ("fast", b"xy"), ("fast", b"xy")]
    assert nc.stats["in_msgs"] == 2
    # Anything else still goes to nats-py, through the read loop.
    reader.feed_data(b"MSG other 9 5\r\nhello\r\n")
    assert len(log) == 3
    for _ in range(3):
        await asyncio.sleep(0)
    assert log[3] == ("msg", 9, b"other", b"", b"hello", None)
    reader.feed_eof()
    await task
