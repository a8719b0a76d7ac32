"""Streamed responses as they happen, and how a stream ends when something dies.

A cut stream must look cut to the client (curl reports an incomplete or
reset transfer), never like a complete body; a client that leaves must
reach the app (its connection closes); a body once streamed is never sent
again by a retry.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path

import pytest

from tests.fixtures.nats_server import NatsServer
from tests.integration.stream.stream_harness import BLOCK, Mesh, curl, running_mesh

pytestmark = pytest.mark.integration

#: curl's exit codes for a transfer that did not complete: 18 partial file
#: (shorter than its Content-Length or its chunked framing), 56 receive
#: failure (reset), 52 nothing received.
CUT = {18, 52, 56}


async def endless(mesh: Mesh) -> asyncio.subprocess.Process:
    """curl on the app's endless stream, its first tick read."""
    proc = await start_curl(mesh, "/endless")
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 5) == b"tick\n"
    return proc


async def start_curl(mesh: Mesh, path: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "curl",
        "-sSN",
        "-H",
        "Host: orders.shop",
        mesh.url(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_server_sent_events_arrive_one_per_second(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Each event reaches the caller when the app writes it, not when it finishes."""
    async with running_mesh(nats_server.url, tmp_path) as mesh:
        proc = await start_curl(mesh, "/sse?n=3&every=1")
        assert proc.stdout is not None
        t0 = time.monotonic()
        seen: list[float] = []
        while len(seen) < 3:
            line = await asyncio.wait_for(proc.stdout.readline(), 5)
            assert line, "the stream ended early"
            if line.startswith(b"data: event"):
                seen.append(time.monotonic() - t0)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
        # The first event long before the app's last (which comes at 2 s).
        # (bounds wide enough for a loaded two-core box, narrow enough to
        # tell one per second from all at the end)
        assert seen[0] < 1.0, seen
        for earlier, later in itertools.pairwise(seen):
            assert 0.5 < later - earlier < 1.6, seen


async def test_callee_sidecar_killed_mid_stream_cuts_the_callers_response(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with running_mesh(
        nats_server.url, tmp_path, NATSMESH_STREAM_IDLE_TIMEOUT_SECONDS="1"
    ) as mesh:
        proc = await endless(mesh)
        mesh.callee.proc.kill()
        t0 = time.monotonic()
        rc = await asyncio.wait_for(proc.wait(), 10)
        assert rc in CUT, rc
        # Within the idle timeout and a beat of it (and the box's load).
        assert time.monotonic() - t0 < 4
        # With no callee left, a streamed upload is refused at once: no responders.
        upload = tmp_path / "upload.bin"
        upload.write_bytes(BLOCK * 2)
        rc, out, err = await curl("--data-binary", f"@{upload}", mesh.url("/upload"))
        assert rc == 0, err
        assert json.loads(out)["error"] == "no_responders"


@pytest.mark.parametrize("dies", ["caller-sidecar", "nats-server"])
async def test_caller_side_or_nats_dying_mid_stream_closes_the_apps_connection(
    nats_server: NatsServer, tmp_path: Path, dies: str
) -> None:
    async with running_mesh(
        nats_server.url, tmp_path, NATSMESH_STREAM_IDLE_TIMEOUT_SECONDS="1"
    ) as mesh:
        proc = await endless(mesh)
        if dies == "nats-server":
            nats_server.stop()
        else:
            mesh.caller.proc.kill()
        # The client's transfer is cut (its sidecar reset it, or died)...
        assert await asyncio.wait_for(proc.wait(), 5) in CUT
        # ...and the callee, hearing nothing past the idle timeout, closes the app's call.
        await asyncio.wait_for(mesh.state.endless_closed.wait(), 5)


async def test_app_dying_mid_body_cuts_the_stream(nats_server: NatsServer, tmp_path: Path) -> None:
    size = 4 * 1024 * 1024
    async with running_mesh(nats_server.url, tmp_path) as mesh:
        rc, out, _ = await curl(mesh.url(f"/broken/{size}"), within=20)
        assert rc in CUT, rc
        assert len(out) < size
        assert out == BLOCK[: len(out)]
        # The mesh is fine afterwards.
        rc, out, _ = await curl(mesh.url("/download/2000000"))
        assert (rc, len(out)) == (0, 2000000)


async def test_caller_going_away_closes_the_apps_connection(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with running_mesh(nats_server.url, tmp_path) as mesh:
        proc = await endless(mesh)
        proc.kill()
        await proc.wait()
        # The caller's abort reaches the callee, which closes the app's connection.
        await asyncio.wait_for(mesh.state.endless_closed.wait(), 5)


async def test_a_streamed_upload_is_never_retried(nats_server: NatsServer, tmp_path: Path) -> None:
    """The route retries 5xx, POST included; a streamed body is still sent once."""
    retries = {"attempts": 3, "retryOn": ["5xx"], "retryNonIdempotent": True}
    rule = {"retries": retries, "circuitBreaker": {"consecutiveFailures": 100}}
    async with running_mesh(nats_server.url, tmp_path, rule=rule) as mesh:
        upload = tmp_path / "upload.bin"
        upload.write_bytes(BLOCK * 2)
        rc, out, err = await curl("--data-binary", f"@{upload}", mesh.url("/upload-503"))
        assert rc == 0, err
        assert json.loads(out) == {"error": "unavailable"}
        assert mesh.state.uploads == 1
        # A small POST on the same route is retried as configured.
        rc, out, err = await curl("--data-binary", "small", mesh.url("/upload-503"))
        assert rc == 0, err
        assert mesh.state.uploads == 1 + 4
        # A streamed response on a rule with retries and a breaker: relayed once.
        rc, out, err = await curl(mesh.url("/download/3000000"))
        assert (rc, len(out)) == (0, 3000000), err


async def test_a_stalled_upload_is_cut_after_the_idle_timeout(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Beats keep a quiet stream alive, but a client that stops half-way
    through its body does not hold the app for ever: 502, the app's request cut."""
    async with running_mesh(
        nats_server.url, tmp_path, NATSMESH_STREAM_IDLE_TIMEOUT_SECONDS="1"
    ) as mesh:
        reader, writer = await asyncio.open_connection("127.0.0.1", mesh.caller.listen_port)
        size = 4 * 1024 * 1024
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: orders.shop\r\nContent-Length: %d\r\n\r\n" % size
        )
        writer.write(BLOCK * 2)  # half of it, then nothing
        await writer.drain()
        t0 = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 502"), head
        assert 0.9 < time.monotonic() - t0 < 5
        writer.close()
        assert mesh.state.uploads == 0  # the app never got a whole body


async def test_a_stream_in_flight_finishes_while_its_callee_sidecar_drains(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A rollout's SIGTERM to the callee's sidecar: the stream it serves runs to
    its end within the drain grace, as a unary call in flight does."""
    async with running_mesh(nats_server.url, tmp_path, NATSMESH_DRAIN_SECONDS="5") as mesh:
        proc = await start_curl(mesh, "/sse?n=4&every=0.5")
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 5)
        assert first, "no first event"
        mesh.callee.proc.terminate()
        rest = await asyncio.wait_for(proc.stdout.read(), 10)
        events = [line for line in (first + rest).splitlines() if line.startswith(b"data: event")]
        assert len(events) == 4, first + rest
        assert await asyncio.wait_for(proc.wait(), 5) == 0
        # Having drained its stream, the sidecar exits on its own, before its grace is up.
        assert await asyncio.to_thread(mesh.callee.proc.wait, 10) == 0


async def test_a_stream_outliving_the_drain_grace_is_cut_at_its_end(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """What is still open when the grace is over is cut, and the caller is told
    at once: its client sees a reset then, not after the idle timeout (60 s)."""
    async with running_mesh(nats_server.url, tmp_path, NATSMESH_DRAIN_SECONDS="1") as mesh:
        proc = await endless(mesh)
        t0 = time.monotonic()
        mesh.callee.proc.terminate()
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.read(), 10)
        code = await asyncio.wait_for(proc.wait(), 5)
        took = time.monotonic() - t0
        assert code in CUT, code
        # Not before the grace (the stream was served until then), not much after.
        assert 0.9 < took < 5, took
        # The app's connection was closed: its endless writer stopped.
        await asyncio.wait_for(mesh.state.endless_closed.wait(), 5)
