"""A malicious callee cannot desynchronise its caller's keep-alive connection.

The callee here is a raw nats-py responder on the service subject (what a
tenant holding the service's creds could run instead of the sidecar). It
answers with statuses outside 200-599, non-numeric statuses, headers whose
values carry CR/LF/NUL and a body that is itself two forged HTTP responses.
On one keep-alive connection the app's next request must get *its own*
answer: the forged status becomes a 502 with a JSON error, nothing the callee
wrote splits the response, and a legitimate service beside it still works.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from natsmesh_sidecar import subjects
from natsmesh_sidecar.app import Sidecar
from tests.fixtures.nats_server import NatsServer
from tests.integration.sidecar.sidecar_harness import (
    Client,
    TestApp,
    destination,
    settings,
    table,
)

pytestmark = pytest.mark.timeout(60)

#: Two complete responses hidden in a body: if the caller's sidecar wrote a
#: 1xx (no Content-Length) with this body, they would answer the next requests.
SMUGGLED = (
    b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nx-forged: 1\r\n\r\nforged1"
    b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nx-forged: 2\r\n\r\nforged2"
)

#: path -> (Nm-Status, extra headers) the evil callee answers with.
ANSWERS: dict[str, tuple[str | None, dict[str, str]]] = {
    "/s100": ("100", {}),
    "/s101": ("101", {}),
    "/s199": ("199", {}),
    "/s999": ("999", {}),
    "/s600": ("600", {}),
    "/s000": ("000", {}),
    "/sneg": ("-200", {}),
    "/splus": ("+200", {}),
    "/sword": ("OK", {}),
    "/sempty": ("", {}),
    "/snone": (None, {}),
    "/s2x0": ("2x0", {}),
    "/slong": ("2000", {}),
    "/sunicode": ("\uff12\uff10\uff10", {}),  # fullwidth digits: isdigit() says yes
    # A bare LF survives NATS header parsing (lines end in CRLF): the value
    # would end the HTTP header line and start a new one.
    "/lf": ("200", {"X-Evil": "a\nx-injected: 1\n\nHTTP/1.1 200 OK"}),
    "/nul": ("200", {"X-Evil": "a\x00b", "X-Fine": "kept"}),
    "/cr": ("200", {"X-Evil": "a\rx-injected: 1"}),
    "/badname": ("200", {"X(Evil)": "v", "X-Fine": "kept"}),
}


@dataclass
class Mesh:
    caller: Sidecar
    evil: NATS
    good: Sidecar
    app: TestApp


async def evil_responder(nc: NATS) -> None:
    async def answer(msg: Msg) -> None:
        target = (msg.headers or {}).get("Nm-Target", "")
        status, extra = ANSWERS.get(target, ("200", {}))
        headers = {"content-type": "text/plain", **extra}
        if status is not None:
            headers["Nm-Status"] = status
        # Raw protocol write: nats-py would blank CR/LF in header values, a
        # hostile client need not. The header block is ours, byte for byte.
        block = b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        block += b"\r\n"
        payload = block + SMUGGLED
        await nc._send_command(  # a hostile client writes raw protocol
            b"HPUB %s %d %d\r\n%s\r\n" % (msg.reply.encode(), len(block), len(payload), payload)
        )
        await nc._flush_pending()

    await nc.subscribe(
        subjects.request_subject("shop", "evil", "v1") + ".*.*",
        queue=subjects.queue_group("evil"),
        cb=answer,
    )
    await nc.flush()


@pytest.fixture
async def mesh(nats_server: NatsServer) -> AsyncIterator[Mesh]:
    app = await TestApp().start()
    good = Sidecar(settings("orders", "shop", nats_server.url, app.port), table("shop", "orders"))
    caller = Sidecar(
        settings("web", "shop", nats_server.url),
        table(
            "shop",
            "web",
            destinations=[
                destination("shop", "evil", timeoutMs=3000),
                destination("shop", "orders", timeoutMs=3000),
            ],
        ),
        access_log=False,
    )
    evil = await nats.connect(nats_server.url)
    await evil_responder(evil)
    for s in (good, caller):
        await s.start()
        await s.wait_ready()
    try:
        yield Mesh(caller, evil, good, app)
    finally:
        await caller.stop()
        await good.stop()
        await evil.close()
        await app.stop()


@pytest.mark.parametrize("path", sorted(p for p, (s, _) in ANSWERS.items() if s != "200"))
async def test_bad_status_is_502_and_next_request_gets_its_own_answer(
    mesh: Mesh, path: str
) -> None:
    c = await Client.open(mesh.caller.outbound_port)
    try:
        bad = await c.request("GET", path, host="evil")
        assert bad.status == 502, (bad.status, bad.body)
        assert bad.json()["error"] == "bad_status"
        assert bad.header("x-request-id")
        assert b"forged" not in bad.body
        # Same keep-alive connection: the app's next calls get their own answers.
        for n in range(3):
            ok = await c.request("GET", f"/mine/{n}", host="orders")
            assert ok.status == 200
            assert ok.header("x-forged") is None
            assert ok.json()["path"] == f"/mine/{n}"
    finally:
        c.close()


@pytest.mark.parametrize("path", ["/lf", "/cr", "/nul", "/badname"])
async def test_control_bytes_in_callee_headers_never_split_the_response(
    mesh: Mesh, path: str
) -> None:
    c = await Client.open(mesh.caller.outbound_port)
    try:
        # Pipelined: the evil answer and a legitimate one written back to back.
        raw = (
            f"GET {path} HTTP/1.1\r\nHost: evil\r\n\r\nGET /after HTTP/1.1\r\nHost: orders\r\n\r\n"
        ).encode()
        first, second = c.send_raw(raw, expect=2)
        evil = await asyncio.wait_for(first, 10)
        after = await asyncio.wait_for(second, 10)
        assert evil.status == 200
        names = {k.lower() for k, _ in evil.headers}
        assert "x-injected" not in names
        assert "x-evil" not in names
        assert "x(evil)" not in names
        if path in ("/nul", "/badname"):
            assert evil.header("x-fine") == "kept"  # the valid headers beside it stay
        # The callee's body is only a body: exactly its bytes, its length.
        assert evil.body == SMUGGLED
        assert after.status == 200
        assert json.loads(after.body)["path"] == "/after"
        # Nothing more is waiting on the connection: one more call, one answer.
        last = await c.request("GET", "/last", host="orders")
        assert last.json()["path"] == "/last"
    finally:
        c.close()


async def test_app_cannot_inject_headers_towards_the_callee(mesh: Mesh) -> None:
    """The app's own request headers with control bytes stop at its sidecar."""
    c = await Client.open(mesh.caller.outbound_port)
    try:
        futs = c.send_raw(b"GET /one HTTP/1.1\r\nHost: orders\r\nX-A: a\x00b\r\n\r\n", expect=1)
        try:
            r = await asyncio.wait_for(futs[0], 10)
        except ConnectionError:
            r = None  # refusing the connection is as good as a 400
        if r is not None:
            assert r.status in (200, 400)
            if r.status == 200:
                seen = mesh.app.requests[-1]
                assert all("\x00" not in v for _, v in seen.headers)
    finally:
        c.close()
    ok = await Client.open(mesh.caller.outbound_port)
    try:
        assert (await ok.request("GET", "/fine", host="orders")).status == 200
    finally:
        ok.close()
