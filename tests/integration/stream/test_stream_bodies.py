"""Bodies larger than one NATS message, both ways, through two sidecar processes.

curl (Debian's) uploads and downloads against an aiohttp app; bytes are
compared by sha256 and each sidecar's RSS is sampled throughout.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest

from bench.sidecar import rss_mb
from natsmesh_sidecar.wire import StreamLimits
from tests.fixtures.nats_server import NatsServer
from tests.integration.stream.stream_harness import (
    BLOCK,
    curl,
    pattern_sha256,
    running_mesh,
)

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
SIZE = 64 * MIB
#: What a sidecar may grow by while carrying a body of any size.
RSS_BUDGET_MB = 16.0
#: The sidecars' stream chunk (NATSMESH_STREAM_CHUNK_BYTES's default).
CHUNK_BYTES = StreamLimits().chunk_bytes


class Peaks:
    """The highest RSS of some processes, sampled until stopped."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = {pid: rss_mb(pid) for pid in pids}
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_mb(pid))
            await asyncio.sleep(0.02)

    def stop(self) -> dict[int, float]:
        self._task.cancel()
        return self.peak


@pytest.mark.timeout(120)
async def test_64mib_up_and_down_byte_exact_in_bounded_memory(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with running_mesh(nats_server.url, tmp_path) as mesh:
        sides = [mesh.caller.pid, mesh.callee.pid]
        idle = {pid: rss_mb(pid) for pid in sides}
        peaks = Peaks(sides)
        upload = tmp_path / "upload.bin"
        upload.write_bytes(BLOCK * (SIZE // MIB))

        t0 = time.monotonic()
        rc, out, err = await curl("--data-binary", f"@{upload}", mesh.url("/upload"))
        up_s = time.monotonic() - t0
        assert rc == 0, err
        got = json.loads(out)
        assert got == {"sha256": pattern_sha256(SIZE), "bytes": SIZE, "te": ""}

        t0 = time.monotonic()
        down = tmp_path / "download.bin"
        rc, _, err = await curl("-o", str(down), mesh.url(f"/download/{SIZE}"))
        down_s = time.monotonic() - t0
        assert rc == 0, err
        assert down.stat().st_size == SIZE
        assert hashlib.sha256(down.read_bytes()).hexdigest() == pattern_sha256(SIZE)

        peak = peaks.stop()
        for pid in sides:
            assert peak[pid] - idle[pid] <= RSS_BUDGET_MB, (idle, peak)
        print(
            f"64 MiB up {SIZE / up_s / 1e6:.0f} MB/s, down {SIZE / down_s / 1e6:.0f} MB/s;"
            f" RSS idle {idle}, peak {peak}"
        )


async def test_chunked_upload_and_chunked_download_of_unknown_length(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Transfer-Encoding: chunked both ways: the app sees a chunked request
    (no length was known), the client a chunked response, both whole."""
    size = 5 * MIB + 123
    async with running_mesh(nats_server.url, tmp_path) as mesh:
        upload = tmp_path / "upload.bin"
        upload.write_bytes((BLOCK * 6)[:size])
        rc, out, err = await curl(
            "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{upload}", mesh.url("/upload")
        )
        assert rc == 0, err
        assert json.loads(out) == {
            "sha256": pattern_sha256(size),
            "bytes": size,
            "te": "chunked",
        }
        rc, out, err = await curl("-D", "-", mesh.url(f"/download/{size}?chunked=1"))
        assert rc == 0, err
        head, _, body = out.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        assert hashlib.sha256(body).hexdigest() == pattern_sha256(size)
        # A small request and answer on the same mesh still take the unary path.
        rc, out, err = await curl(mesh.url("/download/1000"))
        assert (rc, len(out)) == (0, 1000)


async def start_upload(port: int, size: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client that sends the head and half of a ``size`` body, then waits."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: orders.shop\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % size
    )
    writer.write((BLOCK * 4)[: size // 2])
    await writer.drain()
    return reader, writer


async def test_uploads_in_hand_count_against_the_callees_byte_budget(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Each open upload holds at least one chunk of NATSMESH_INBOUND_MAX_BYTES
    (more for the credit it has not used): past what its credit may take an
    upload is slowed, not refused, but once the budget cannot take the first
    chunk of another the next is answered 503 at once, so concurrent uploads
    cannot grow the callee's memory without bound; the ones in hand finish."""
    size = 2 * MIB
    most = MIB // CHUNK_BYTES
    async with running_mesh(nats_server.url, tmp_path, NATSMESH_INBOUND_MAX_BYTES=str(MIB)) as mesh:
        port = mesh.caller.listen_port
        uploads = await asyncio.gather(*(start_upload(port, size) for _ in range(most + 1)))

        async def answered(reader: asyncio.StreamReader) -> bytes | None:
            try:
                return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1.0)
            except TimeoutError:
                return None  # its head is in the callee's hands

        heads = await asyncio.gather(*(answered(reader) for reader, _ in uploads))
        in_hand, refused = [], []
        for (reader, writer), head in zip(uploads, heads, strict=True):
            if head is None:
                in_hand.append((reader, writer))
            else:
                refused.append(head)
                writer.close()
        assert refused, f"{most + 1} uploads in hand on a budget of {most} chunks"
        assert all(head.startswith(b"HTTP/1.1 503") for head in refused), refused
        # Fewer than the budget's chunks, more than one: the first did not
        # take the budget for a window of its own.
        assert 2 <= len(in_hand) <= most, len(in_hand)

        async def rest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write((BLOCK * 4)[size // 2 : size])
            await writer.drain()
            response = await asyncio.wait_for(reader.read(), 20)
            writer.close()
            assert response.startswith(b"HTTP/1.1 200"), response[:200]
            assert json.loads(response.partition(b"\r\n\r\n")[2])["sha256"] == pattern_sha256(size)

        await asyncio.gather(*(rest(*upload) for upload in in_hand))
