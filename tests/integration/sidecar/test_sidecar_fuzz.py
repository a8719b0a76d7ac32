"""Bounded fuzzing of both sidecar edges with hypothesis: never crash, keep serving.

The mesh (two sidecars + app) runs on an event loop in a background thread so
hypothesis can drive it with plain blocking sockets and NATS publishes; after
every example a well-formed request must still succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natsmesh_sidecar import subjects
from natsmesh_sidecar.app import Sidecar
from tests.fixtures.nats_server import NatsServer
from tests.integration.sidecar.sidecar_harness import TestApp, destination, table
from tests.integration.sidecar.sidecar_harness import settings as sidecar_settings

pytestmark = pytest.mark.integration
T = TypeVar("T")
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class BackgroundMesh:
    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.nc: Any = None

    def run(self, coro: Any, within: float = 20.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(within)

    async def start(self) -> None:
        self.app = await TestApp().start()
        self.server = Sidecar(
            sidecar_settings("orders", "shop", self.url, self.app.port),
            table("shop", "orders"),
            access_log=False,
        )
        self.caller = Sidecar(
            sidecar_settings("web", "shop", self.url),
            table("shop", "web", destinations=[destination("shop", "orders", timeoutMs=2000)]),
            access_log=False,
            header_timeout=0.3,
        )
        for s in (self.server, self.caller):
            await s.start()
            await s.wait_ready()
        # A caller named "web": its inbox is where a real caller gets replies.
        self.nc = await nats.connect(self.url, inbox_prefix=subjects.inbox_prefix("web"))

    async def stop(self) -> None:
        await self.nc.close()
        await self.caller.stop()
        await self.server.stop()
        await self.app.stop()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def bg(nats_server: NatsServer) -> Iterator[BackgroundMesh]:
    m = BackgroundMesh(nats_server.url)
    m.run(m.start())
    yield m
    m.run(m.stop())
    m.close()


def exchange(port: int, data: bytes, *, wait: float = 3.0, chunks: int = 1) -> bytes:
    """Send bytes (optionally split), read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        step = max(1, len(data) // chunks)
        try:
            for i in range(0, len(data), step):
                s.sendall(data[i : i + step])
        except OSError:
            pass  # the server may close early (e.g. 431): that is an answer
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        out = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                got = s.recv(65536)
            except (TimeoutError, OSError):
                break
            if not got:
                break
            out += got
        return out


def still_serving(port: int) -> None:
    resp = exchange(port, b"GET /alive HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 200"), resp[:200]


def status_of(resp: bytes) -> int | None:
    if not resp.startswith(b"HTTP/1.1 "):
        return None
    return int(resp[9:12])


_token = st.text(
    alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    min_size=0,
    max_size=12,
)
_junk = st.binary(min_size=0, max_size=64)


@st.composite
def request_lines(draw: st.DrawFn) -> bytes:
    method = draw(st.one_of(_token, st.sampled_from(["GET", "POST", "CONNECT", "PRI", "G\x00T"])))
    target = draw(
        st.one_of(
            st.text(max_size=40), st.sampled_from(["/", "*", "http://orders/x", "//", "http://"])
        )
    )
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9", "", "FOO"]))
    sep = draw(st.sampled_from([" ", "  ", "\t", ""]))
    extra = draw(_junk)
    line = f"{method}{sep}{target}{sep}{version}".encode("utf-8", "replace")
    return line + b"\r\nHost: orders\r\n" + extra + b"\r\n\r\n"


@FUZZ
@given(data=st.one_of(request_lines(), st.binary(max_size=300)))
def test_fuzz_malformed_requests(bg: BackgroundMesh, data: bytes) -> None:
    resp = exchange(bg.caller.outbound_port, data, wait=1.0)
    status = status_of(resp)
    assert resp == b"" or status is not None, resp[:100]
    still_serving(bg.caller.outbound_port)


@FUZZ
@given(size=st.integers(min_value=70_000, max_value=300_000), many=st.booleans())
def test_fuzz_huge_headers_431(bg: BackgroundMesh, size: int, many: bool) -> None:
    if many:
        headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(size // 100))
    else:
        headers = b"X-Big: " + b"v" * size + b"\r\n"
    resp = exchange(
        bg.caller.outbound_port, b"GET / HTTP/1.1\r\nHost: orders\r\n" + headers + b"\r\n"
    )
    assert status_of(resp) == 431, resp[:100]
    still_serving(bg.caller.outbound_port)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        payload = draw(st.binary(max_size=20))
        size = draw(
            st.one_of(
                st.just(f"{len(payload):x}"),
                st.text(max_size=6),
                st.just("-1"),
                st.just("fffffffffffffffff"),
            )
        )
        parts.append(
            size.encode("utf-8", "replace")
            + b"\r\n"
            + payload
            + draw(st.sampled_from([b"\r\n", b"", b"\n", b"xx"]))
        )
    parts.append(draw(st.sampled_from([b"0\r\n\r\n", b"", b"0\r\n", b"zz\r\n\r\n"])))
    return b"".join(parts)


@FUZZ
@given(body=chunked_bodies())
def test_fuzz_invalid_chunking(bg: BackgroundMesh, body: bytes) -> None:
    head = b"POST /c HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\n"
    resp = exchange(bg.caller.outbound_port, head + body, wait=1.0)
    status = status_of(resp)
    # Valid chunking reaches the app (200); anything else is answered 400 or 408
    # (incomplete and the client went quiet) -- never a hang, never a crash.
    assert status in (200, 400, 408) or resp == b"", resp[:100]
    still_serving(bg.caller.outbound_port)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prefix=st.sampled_from(
        [b"GET /", b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: orders\r\nX-Slow: a"]
    )
)
def test_fuzz_slowloris_bounded(bg: BackgroundMesh, prefix: bytes) -> None:
    port = bg.caller.outbound_port
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(prefix)
        # Trickle a byte at a time, never finishing the headers.
        out = b""
        for _ in range(10):
            try:
                s.sendall(b"a")
            except OSError:
                break
            time.sleep(0.05)
        s.settimeout(2.0)
        try:
            while True:
                got = s.recv(4096)
                if not got:
                    break
                out += got
        except (TimeoutError, OSError):
            pass
    assert status_of(out) == 408, out[:100]
    assert time.monotonic() - t0 < 3.0
    still_serving(port)


_hname = st.text(
    alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    min_size=1,
    max_size=16,
)
_hval = st.text(max_size=40)


@FUZZ
@given(
    headers=st.dictionaries(
        st.one_of(
            _hname,
            st.sampled_from(
                [
                    "Nm-Method",
                    "Nm-Target",
                    "Nm-Timeout-Ms",
                    "Host",
                    "Content-Length",
                    "Transfer-Encoding",
                ]
            ),
        ),
        st.one_of(
            _hval, st.sampled_from(["GET", "/", "-5", "99999999999", "chunked", "G ET", "/\x00"])
        ),
        max_size=6,
    ),
    payload=st.binary(max_size=200),
)
def test_fuzz_inbound_garbage_headers(
    bg: BackgroundMesh, headers: dict[str, str], payload: bytes
) -> None:
    async def send() -> Any:
        try:
            return await bg.nc.request(
                "mesh.shop.orders.v1.shop.web", payload, timeout=3, headers=headers or None
            )
        except nats.errors.Error as exc:
            return exc

    reply = bg.run(send())
    # Garbage gets an answer (a status) -- never a crash, never silence.
    assert not isinstance(reply, Exception), reply
    assert reply.headers is not None
    assert "Nm-Status" in reply.headers
    assert 200 <= int(reply.headers["Nm-Status"]) <= 599
    still_serving(bg.caller.outbound_port)
