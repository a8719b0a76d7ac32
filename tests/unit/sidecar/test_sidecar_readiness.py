"""Readiness-aware membership, the pure part: when a sidecar joins and leaves."""

from __future__ import annotations

import asyncio

import pytest

from natsmesh_sidecar import readiness
from natsmesh_sidecar.readiness import Gate


def test_joins_on_the_first_success_and_not_before() -> None:
    g = Gate(failure_threshold=3)
    # A starting app: failures never "leave" what was never joined.
    assert [g.observe(False) for _ in range(5)] == [None] * 5
    assert not g.ready
    assert g.observe(True) is True
    assert g.ready
    assert g.observe(True) is None


def test_leaves_after_threshold_failures_in_a_row_and_rejoins() -> None:
    g = Gate(failure_threshold=3)
    g.observe(True)
    # One or two failed checks (a GC pause, a slow answer) are forgiven ...
    assert g.observe(False) is None
    assert g.observe(False) is None
    assert g.observe(True) is None
    assert g.ready
    # ... three in a row are not.
    assert [g.observe(False) for _ in range(3)] == [None, None, False]
    assert not g.ready
    assert g.observe(False) is None
    assert g.observe(True) is True


def test_starting_and_failing_apps_are_checked_faster() -> None:
    g = Gate(failure_threshold=3)
    assert g.next_delay(1.0) == pytest.approx(1.0 / readiness.FAST_FACTOR)
    g.observe(True)
    assert g.next_delay(1.0) == 1.0
    g.observe(False)
    assert g.next_delay(1.0) == pytest.approx(1.0 / readiness.FAST_FACTOR)


async def test_check_once_tcp_and_http_statuses() -> None:
    """Against a real local listener: the check's own parsing of answers."""
    answers = {"/ok": b"HTTP/1.1 204 No Content", "/moved": b"HTTP/1.0 302 Found"}
    answers |= {"/bad": b"HTTP/1.1 503 Unavailable", "/junk": b"SSH-2.0-OpenSSH"}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        path = line.split()[1].decode() if line.count(b" ") >= 2 else ""
        writer.write(answers.get(path, b"HTTP/1.1 404 Not Found") + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        check = readiness.check_once
        assert await check("127.0.0.1", port, "tcp", 1.0)
        assert await check("127.0.0.1", port, "/ok", 1.0)
        assert await check("127.0.0.1", port, "/moved", 1.0)
        assert not await check("127.0.0.1", port, "/bad", 1.0)
        assert not await check("127.0.0.1", port, "/junk", 1.0)
        assert not await check("127.0.0.1", port, "/missing", 1.0)
    finally:
        server.close()
        await server.wait_closed()
    # Nothing listening any more: refused, for both kinds.
    assert not await readiness.check_once("127.0.0.1", port, "tcp", 1.0)
    assert not await readiness.check_once("127.0.0.1", port, "/ok", 1.0)
