"""Two in-process sidecars, a real nats-server and a small app: the HTTP path end to end."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from natsmesh_sidecar.app import Sidecar
from tests.fixtures.nats_server import NatsServer
from tests.integration.sidecar.sidecar_harness import (
    AppReply,
    AppRequest,
    Client,
    TestApp,
    destination,
    echo,
    request,
    settings,
    table,
)

pytestmark = pytest.mark.integration


@dataclass
class Mesh:
    app: TestApp
    caller: Sidecar  # "web" in namespace shop: the client side
    server: Sidecar  # "orders" in namespace shop: in front of the app

    @property
    def port(self) -> int:
        return self.caller.outbound_port


async def start_mesh(nats: NatsServer, app: TestApp, **rule: Any) -> Mesh:
    await app.start()
    server = Sidecar(settings("orders", "shop", nats.url, app.port), table("shop", "orders"))
    caller = Sidecar(
        settings("web", "shop", nats.url),
        table(
            "shop",
            "web",
            destinations=[destination("shop", "orders", **rule), destination("shop", "gone")],
            known=("billing.shop", "orders.shop", "gone.shop"),
        ),
    )
    await server.start()
    await caller.start()
    await server.wait_ready()
    await caller.wait_ready()
    return Mesh(app, caller, server)


async def stop_mesh(mesh: Mesh) -> None:
    await mesh.caller.stop()
    await mesh.server.stop()
    await mesh.app.stop()


@pytest.fixture
async def mesh(nats_server: NatsServer) -> AsyncIterator[Mesh]:
    m = await start_mesh(nats_server, TestApp())
    yield m
    await stop_mesh(m)


async def test_exact_status_headers_body_through_two_sidecars(mesh: Mesh) -> None:
    async def handler(req: AppRequest) -> AppReply:
        return AppReply(
            201,
            [
                ("Content-Type", "application/vnd.test+json"),
                ("X-Custom", "a b  c"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("Status", "not-a-nats-status"),
            ],
            b'{"created": true, "bytes": "\x00\xff"}',
        )

    mesh.app.handler = handler
    r = await request(
        mesh.port,
        "PUT",
        "/orders/42?x=1&y=%20",
        headers=[
            ("X-Trace-Me", "yes"),
            ("Accept", "a/b"),
            ("Accept", "c/d"),
            ("Idempotency-Key", "order-42"),
        ],
        body=b"payload\x00\xff",
    )
    assert r.status == 201
    assert r.body == b'{"created": true, "bytes": "\x00\xff"}'
    assert r.header("content-type") == "application/vnd.test+json"
    assert r.header("x-custom") == "a b  c"
    assert [v for k, v in r.headers if k.lower() == "set-cookie"] == ["a=1", "b=2"]
    assert r.header("status") == "not-a-nats-status"
    assert r.header("content-length") == str(len(r.body))
    got = mesh.app.requests[-1]
    assert got.method == "PUT"
    assert got.path == "/orders/42?x=1&y=%20"
    assert got.body == b"payload\x00\xff"
    assert got.header("x-trace-me") == "yes"
    assert got.header("idempotency-key") == "order-42"
    assert [v for k, v in got.headers if k.lower() == "accept"] == ["a/b", "c/d"]
    assert got.header("x-request-id")
    assert got.header("traceparent")


async def test_request_id_and_traceparent_propagate(mesh: Mesh) -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    r = await request(
        mesh.port, "GET", "/x", headers=[("X-Request-Id", "rid-1"), ("traceparent", tp)]
    )
    assert r.status == 200
    got = mesh.app.requests[-1]
    assert got.header("x-request-id") == "rid-1"
    new = got.header("traceparent")
    assert new is not None
    assert new.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert new.split("-")[2] != "b7ad6b7169203331"
    # No incoming ids: the sidecar creates both.
    await request(mesh.port, "GET", "/y")
    got = mesh.app.requests[-1]
    assert len(got.header("x-request-id") or "") == 36
    assert len(got.header("traceparent") or "") == 55


async def test_absolute_uri_proxy_and_host_forms(mesh: Mesh) -> None:
    c = await Client.open(mesh.port)
    try:
        (fut,) = c.send_raw(b"GET http://orders.shop/p?q=1 HTTP/1.1\r\nHost: orders.shop\r\n\r\n")
        r = await asyncio.wait_for(fut, 5)
        assert r.status == 200
        assert mesh.app.requests[-1].path == "/p?q=1"
        for host in ("orders", "orders.shop", "orders.shop.svc.cluster.local", "orders:80"):
            r = await c.request("GET", "/h", host=host)
            assert r.status == 200, host
    finally:
        c.close()


async def test_keep_alive_pipelining_and_chunked(mesh: Mesh) -> None:
    c = await Client.open(mesh.port)
    try:
        raw = b"".join(
            f"GET /pipe/{i} HTTP/1.1\r\nHost: orders\r\n\r\n".encode() for i in range(10)
        ) + (
            b"POST /chunked HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        futs = c.send_raw(raw, expect=11)
        rs = await asyncio.wait_for(asyncio.gather(*futs), 10)
        for i, r in enumerate(rs[:10]):
            assert r.status == 200
            assert json.loads(r.body)["path"] == f"/pipe/{i}"
        assert json.loads(rs[10].body)["body"] == "hello world"
        assert mesh.app.requests[-1].body == b"hello world"
    finally:
        c.close()


async def test_head_and_204(mesh: Mesh) -> None:
    r = await request(mesh.port, "HEAD", "/status/200")
    assert r.status == 200
    assert r.body == b""
    r = await request(mesh.port, "GET", "/status/204")
    assert r.status == 204


async def test_2mb_body_streams_to_the_app(mesh: Mesh) -> None:
    """Past one NATS message the body streams (natsmesh_sidecar.transport.stream): no more 413."""
    body = bytes(range(256)) * (8 * 1024)
    r = await request(mesh.port, "POST", "/big", body=body)
    assert r.status == 200
    got = [q for q in mesh.app.requests if q.path == "/big"]
    assert len(got) == 1
    assert got[0].body == body
    # The echo (2 MB of JSON) streamed back too; the connection goes on.
    assert r.json()["body"] == body.decode("latin-1")
    assert (await request(mesh.port, "GET", "/after")).status == 200


async def test_unknown_service_404_and_not_permitted_403(mesh: Mesh) -> None:
    r = await request(mesh.port, "GET", "/", host="nosuch")
    assert r.status == 404
    assert r.json()["error"] == "unknown_service"
    assert set(r.json()) == {"error", "message", "requestId"}
    r = await request(mesh.port, "GET", "/", host="billing.shop")
    assert r.status == 403
    assert r.json()["error"] == "forbidden"


async def test_no_responders_503_at_once(mesh: Mesh) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await request(mesh.port, "GET", "/", host="gone")
    assert r.status == 503
    assert r.json()["error"] == "no_responders"
    assert loop.time() - t0 < 1.0


async def test_timeout_504(nats_server: NatsServer) -> None:
    mesh = await start_mesh(nats_server, TestApp(), timeoutMs=200)
    try:
        r = await request(mesh.port, "GET", "/sleep/1500")
        assert r.status == 504
        assert r.json()["error"] == "timeout"
    finally:
        await stop_mesh(mesh)


async def test_app_unreachable_502(nats_server: NatsServer) -> None:
    mesh = await start_mesh(nats_server, TestApp())
    try:
        await mesh.app.stop()
        r = await request(mesh.port, "GET", "/x")
        assert r.status == 502
        assert r.json()["error"] == "app_unreachable"
    finally:
        await stop_mesh(mesh)


async def test_circuit_opens_503_with_retry_after(nats_server: NatsServer) -> None:
    mesh = await start_mesh(
        nats_server,
        TestApp(),
        circuitBreaker={"consecutiveFailures": 2, "openMs": 300, "halfOpenProbes": 1},
    )
    try:
        assert (await request(mesh.port, "GET", "/status/500")).status == 500
        assert (await request(mesh.port, "GET", "/status/503")).status == 503
        r = await request(mesh.port, "GET", "/status/200")
        assert r.status == 503
        assert r.json()["error"] == "circuit_open"
        assert r.header("retry-after") == "1"
        metrics = (await request(mesh.caller.admin_port, "GET", "/metrics")).body.decode()
        dest = next(
            x for x in metrics.splitlines() if x.startswith("natsmesh_sidecar_circuit_state{")
        )
        assert dest.endswith(" 1.0"), dest
        # One call refused so far.
        assert dest.replace("circuit_state", "circuit_refused_total") in metrics
        await asyncio.sleep(0.35)
        # No call since: the next one would probe, and the gauge says so.
        metrics = (await request(mesh.caller.admin_port, "GET", "/metrics")).body.decode()
        assert dest.replace(" 1.0", " 2.0") in metrics
        assert (
            await request(mesh.port, "GET", "/status/200")
        ).status == 200  # half-open probe closes it
        assert (await request(mesh.port, "GET", "/status/200")).status == 200
    finally:
        await stop_mesh(mesh)


async def test_retries_on_5xx_for_idempotent_only(nats_server: NatsServer) -> None:
    calls = {"n": 0}

    async def flaky(req: AppRequest) -> AppReply:
        calls["n"] += 1
        if calls["n"] % 3 != 0:
            return AppReply(503, [], b"busy")
        return AppReply(200, [], b"ok")

    app = TestApp(flaky)
    mesh = await start_mesh(
        nats_server,
        app,
        retries={"attempts": 3, "retryOn": ["5xx"], "backoffBaseMs": 1, "backoffMaxMs": 5},
    )
    try:
        r = await request(mesh.port, "GET", "/r")
        assert (r.status, r.body, calls["n"]) == (200, b"ok", 3)
        calls["n"] = 0
        r = await request(mesh.port, "POST", "/r", body=b"x")
        assert (r.status, calls["n"]) == (503, 1)
    finally:
        await stop_mesh(mesh)


async def test_fault_injection_abort(nats_server: NatsServer) -> None:
    mesh = await start_mesh(
        nats_server, TestApp(), fault={"abort": {"status": 418, "percent": 100}}
    )
    try:
        r = await request(mesh.port, "GET", "/x")
        assert r.status == 418
        assert r.json()["error"] == "fault_injected"
        assert mesh.app.requests == []
    finally:
        await stop_mesh(mesh)


async def test_weighted_split(nats_server: NatsServer) -> None:
    app_v1, app_v2 = TestApp(), TestApp()
    await app_v1.start()
    await app_v2.start()
    s1 = Sidecar(settings("orders", "shop", nats_server.url, app_v1.port), table("shop", "orders"))
    s2 = Sidecar(
        settings("orders", "shop", nats_server.url, app_v2.port, version="v2"),
        table("shop", "orders"),
    )
    caller = Sidecar(
        settings("web", "shop", nats_server.url),
        table(
            "shop",
            "web",
            destinations=[destination("shop", "orders", versions={"v1": 80, "v2": 20})],
        ),
    )
    for s in (s1, s2, caller):
        await s.start()
        await s.wait_ready()
    try:
        c = await Client.open(caller.outbound_port)
        for _ in range(200):
            assert (await c.request("GET", "/w")).status == 200
        c.close()
        assert 120 < len(app_v1.requests) < 190
        assert len(app_v1.requests) + len(app_v2.requests) == 200
    finally:
        for s in (caller, s1, s2):
            await s.stop()
        await app_v1.stop()
        await app_v2.stop()


async def test_malformed_http_400(mesh: Mesh) -> None:
    c = await Client.open(mesh.port)
    (fut,) = c.send_raw(b"GET / HTTP/1.1\r\nHost orders\r\n\r\n")
    r = await asyncio.wait_for(fut, 5)
    assert r.status == 400
    assert r.json()["error"] == "bad_request"
    await asyncio.wait_for(c.proto.closed, 5)
    assert (await request(mesh.port, "GET", "/ok")).status == 200


async def test_nats_down_fails_fast_then_recovers(nats_server: NatsServer) -> None:
    mesh = await start_mesh(nats_server, TestApp())
    try:
        assert (await request(mesh.port, "GET", "/a")).status == 200
        nats_server.stop()
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.2)
        t0 = loop.time()
        r = await request(mesh.port, "GET", "/b")
        assert r.status == 503
        assert r.json()["error"] == "nats_unavailable"
        assert loop.time() - t0 < 0.5
        nats_server.start()
        deadline = loop.time() + 10
        status = 0
        while loop.time() < deadline:
            status = (await request(mesh.port, "GET", "/c")).status
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert status == 200
    finally:
        await stop_mesh(mesh)


async def test_hot_swap_table_without_dropping(nats_server: NatsServer) -> None:
    mesh = await start_mesh(nats_server, TestApp())
    try:
        c = await Client.open(mesh.port)
        stop = asyncio.Event()
        statuses: list[int] = []

        async def load() -> None:
            while not stop.is_set():
                statuses.append((await c.request("GET", "/load")).status)

        task = asyncio.create_task(load())
        old = mesh.caller.router.table
        for i in range(20):
            t = dataclasses.replace(old, generation=f"g{i}")
            mesh.caller.apply_table(t)
            await asyncio.sleep(0.01)
        stop.set()
        await task
        c.close()
        assert statuses
        assert set(statuses) == {200}
        assert mesh.caller.router.table.generation == "g19"
    finally:
        await stop_mesh(mesh)


async def test_metrics_health_ready_and_access_log(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    await request(mesh.port, "GET", "/m", headers=[("X-Request-Id", "metrics-1")])
    await request(mesh.port, "GET", "/", host="nosuch")
    r = await request(mesh.caller.admin_port, "GET", "/metrics")
    text = r.body.decode()
    assert (
        'natsmesh_sidecar_requests_total{destination="orders.shop",direction="outbound",source="web.shop",status="200"}'
        in text
    )
    assert 'status="404"' in text
    assert "natsmesh_sidecar_request_duration_seconds_bucket" in text
    assert "natsmesh_sidecar_nats_connected 1.0" in text
    assert (await request(mesh.caller.admin_port, "GET", "/healthz")).status == 200
    assert (await request(mesh.caller.admin_port, "GET", "/readyz")).status == 200
    out = capsys.readouterr().out
    lines = [json.loads(x) for x in out.splitlines() if '"metrics-1"' in x]
    assert {ln["direction"] for ln in lines} == {"outbound", "inbound"}
    ob = next(ln for ln in lines if ln["direction"] == "outbound")
    assert ob["source"] == "web.shop"
    assert ob["destination"] == "orders.shop"
    assert ob["route"] == "default"
    assert ob["status"] == 200
    assert ob["durationMs"] > 0


async def test_micro_discovery(mesh: Mesh) -> None:
    import nats

    nc = await nats.connect(mesh.server.settings.nats_url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.PING.orders", b"", reply=inbox)
        msg = await sub.next_msg(timeout=2)
        ping = json.loads(msg.data)
        assert ping["type"] == "io.nats.micro.v1.ping_response"
        assert ping["name"] == "orders"
        assert ping["metadata"]["natsmesh.io/serving"] == "true"
        await request(mesh.port, "GET", "/count")
        msg = await nc.request(f"$SRV.STATS.orders.{mesh.server.instance_id}", b"", timeout=2)
        stats = json.loads(msg.data)
        assert stats["endpoints"][0]["subject"] == "mesh.shop.orders.v1"
        assert stats["endpoints"][0]["num_requests"] >= 1
        info = json.loads((await nc.request("$SRV.INFO.orders", b"", timeout=2)).data)
        assert info["endpoints"][0]["queue_group"] == "orders"
    finally:
        await nc.close()


async def test_echo_reference() -> None:
    # The harness app itself answers directly (the baseline of every comparison).
    app = await TestApp(echo).start()
    try:
        r = await request(app.port, "GET", "/status/207")
        assert r.status == 207
    finally:
        await app.stop()
