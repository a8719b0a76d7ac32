"""A route rule's own stream limits (NatsRoute ``maxBodyBytes`` and ``stream``).

Two rules of one route to the same app, told apart by a header: the body one
rule refuses (413, before anything reaches the app, or cut on its way when
chunked) the other carries byte for byte; a rule's idle timeout cuts a
stalled upload long before the sidecar's default does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.nats_server import NatsServer
from tests.integration.stream.stream_harness import BLOCK, Mesh, curl, running_mesh

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
LIMIT = 2 * MIB
RULES: list[dict[str, Any]] = [
    {"name": "tiny", "match": {"headers": {"x-rule": "tiny"}}, "maxBodyBytes": 1000},
    {"name": "small", "match": {"headers": {"x-rule": "small"}}, "maxBodyBytes": LIMIT},
    # Its window (asked of the callee on the head) is not the sidecars' 8.
    {"name": "big", "stream": {"window": 2}},
]


async def upload(mesh: Mesh, rule: str, path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """curl POSTs ``path`` with ``x-rule: rule``: (HTTP status, JSON body)."""
    code, out, err = await curl(
        "-H", f"x-rule: {rule}", *extra, "--data-binary", f"@{path}",
        "-w", "\n%{http_code}", mesh.url("/upload"),
        within=30,
    )  # fmt: skip
    assert code == 0, err
    body, _, status = out.rpartition(b"\n")
    return int(status), json.loads(body)


@pytest.mark.timeout(60)
async def test_a_rules_max_body_is_413_where_another_rule_carries_the_body(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    body = tmp_path / "body.bin"
    body.write_bytes(BLOCK * 3)  # 3 MiB: past one NATS message, past "small"'s limit
    digest = hashlib.sha256(BLOCK * 3).hexdigest()
    async with running_mesh(nats_server.url, tmp_path, rules=RULES) as mesh:
        # With a Content-Length: refused before anything is sent.
        status, answer = await upload(mesh, "small", body)
        assert status == 413, answer
        assert answer["error"] == "payload_too_large"
        assert "maxBodyBytes of route small" in answer["message"]
        assert mesh.state.uploads == 0
        # The same body by the rule without a limit: whole.
        status, answer = await upload(mesh, "big", body)
        assert status == 200, answer
        assert (answer["sha256"], answer["bytes"]) == (digest, 3 * MIB)
        # Chunked (no length to refuse it by): cut where it passes the limit.
        status, answer = await upload(mesh, "small", body, "-H", "Transfer-Encoding: chunked")
        assert status == 413, answer
        assert "maxBodyBytes" in answer["message"]
        await asyncio.sleep(0.3)
        assert mesh.state.uploads == 1, "the app completed a body over the limit"
        # A body small enough to go as one message, over the tiny rule's limit.
        small = tmp_path / "small.bin"
        small.write_bytes(BLOCK[:4096])
        status, answer = await upload(mesh, "tiny", small)
        assert status == 413, answer
        assert "maxBodyBytes of route tiny" in answer["message"]
        status, answer = await upload(mesh, "big", small)
        assert (status, answer["bytes"]) == (200, 4096)


async def stalled_upload(
    mesh: Mesh, rule: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An upload announcing 4 MiB that sends 2 MiB (so it streams) and then stalls."""
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.caller.listen_port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: orders.shop\r\nx-rule: %s\r\n"
        b"Content-Length: %d\r\n\r\n" % (rule.encode(), 4 * MIB)
    )
    writer.write(BLOCK * 2)
    await writer.drain()
    return reader, writer  # the writer kept: collected, it would close the socket


@pytest.mark.timeout(60)
async def test_a_rules_idle_timeout_cuts_a_stalled_upload_before_the_default(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    rules: list[dict[str, Any]] = [
        {
            "name": "quick",
            "match": {"headers": {"x-rule": "quick"}},
            "stream": {"idleTimeoutMs": 1000},
        },
        {"name": "default"},
    ]
    async with running_mesh(
        nats_server.url, tmp_path, rules=rules, NATSMESH_STREAM_IDLE_TIMEOUT_SECONDS="8"
    ) as mesh:
        t0 = time.monotonic()
        (quick, _w1), (default, _w2) = await asyncio.gather(
            stalled_upload(mesh, "quick"), stalled_upload(mesh, "default")
        )
        head = await asyncio.wait_for(quick.readuntil(b"\r\n\r\n"), 6)
        cut_after = time.monotonic() - t0
        assert head.startswith(b"HTTP/1.1 502"), head
        # 1 s without a chunk, noticed at the next quarter-second tick.
        assert cut_after < 4.0, cut_after
        # The sidecars' default (8 s) still holds the other one open.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(default.read(1), 1.0)
        assert mesh.state.uploads == 0
