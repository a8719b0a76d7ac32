"""What both e2e flavours share: HTTP helpers, metrics parsing and the shop scenarios.

The scenarios take a :class:`ShopEndpoints`: where the gateway app listens (the
ingress view) and how to reach a pod's sidecar admin/outbound ports. The local
flavour (test_e2e_shop.py) points them at emulated pods, the kind flavour
(test_e2e_kind.py) at ``kubectl port-forward``s.
"""

from __future__ import annotations

import collections
import hashlib
import http.client as httpc
import json
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
SHOP = REPO / "examples" / "shop"
SHOP_APPS = SHOP / "apps"
#: NatsService resource -> labels of its pods (examples/shop/apps/shop-apps.yaml).
WORKLOADS: dict[str, dict[str, str]] = {
    "gateway": {"app": "gateway"},
    "orders": {"app": "orders", "version": "v1"},
    "orders-v2": {"app": "orders", "version": "v2"},
    "payments": {"app": "payments"},
    "inventory": {"app": "inventory"},
}
#: The shop's optional gRPC service (examples/shop/grpc): its app needs grpcio,
#: so it has an image of its own (natsmesh/example-stock); both flavours install it.
SHOP_GRPC = SHOP / "grpc"
SHOP_GRPC_APPS = SHOP_GRPC / "apps"
GRPC_WORKLOADS: dict[str, dict[str, str]] = {"stock": {"app": "stock"}}
#: The stock levels examples/apps/stock.py starts with.
STOCK = {"book": 12, "lamp": 3}
#: The Watch call's updates and their spacing.
WATCH_UPDATES, WATCH_EVERY = 4, 0.2
CANARY_REQUESTS = 1000
#: What a release of the chart may create, in its namespace and cluster-wide:
#: ``helm uninstall`` must leave none of it behind (but what the chart keeps).
RELEASE_KINDS = (
    "deployments,statefulsets,pods,services,jobs,configmaps,secrets,serviceaccounts,"
    "roles,rolebindings,poddisruptionbudgets,persistentvolumeclaims"
)
RELEASE_CLUSTER_KINDS = (
    "clusterroles,clusterrolebindings,clusterkopfpeerings,"
    "mutatingwebhookconfigurations,validatingwebhookconfigurations"
)
CANARY_CONCURRENCY = 32
#: An upload several NATS messages (1 MiB) long: it streams through the mesh.
UPLOAD_BYTES = 6 * 1024 * 1024
#: The order-status feed's events and their spacing (orders' GET /order-status).
FEED_EVENTS, FEED_EVERY = 5, 0.2

Response = tuple[int, dict[str, str], Any]


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request (JSON in and out); (status, lower-cased headers, parsed body)."""
    scheme, _, rest = url.partition("://")
    assert scheme == "http", url
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    conn = httpc.HTTPConnection(host, int(port or 80), timeout=timeout)
    try:
        return _send(conn, method, "/" + path, body, headers)
    finally:
        conn.close()


def _send(
    conn: httpc.HTTPConnection,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str] | None,
) -> Response:
    data = None if body is None else json.dumps(body).encode()
    hdrs = dict(headers or {})
    if data is not None:
        hdrs.setdefault("content-type", "application/json")
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    raw = resp.read()
    rh = {k.lower(): v for k, v in resp.getheaders()}
    try:
        parsed: Any = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return resp.status, rh, parsed


def many(
    url: str, method: str, path: str, n: int, concurrency: int, timeout: float = 10.0
) -> list[Response]:
    """``n`` requests over ``concurrency`` keep-alive connections (bounded by ``timeout`` each)."""
    _scheme, _, hostport = url.partition("://")
    host, _, port = hostport.partition(":")
    local = threading.local()

    def one(_: int) -> Response:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = httpc.HTTPConnection(host, int(port), timeout=timeout)
        try:
            return _send(conn, method, path, None, None)
        except (OSError, httpc.HTTPException):
            conn.close()
            local.conn = None
            raise

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(n)))


def metric_samples(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# --------------------------------------------------------------------------
# The scenarios
# --------------------------------------------------------------------------


@dataclass
class ShopEndpoints:
    namespace: str
    gateway: str
    """Base URL of the gateway app, as an ingress would reach it."""
    outbound: Callable[[str], str]
    """Base URL of the sidecar outbound proxy of one workload (a WORKLOADS key)."""
    admin: Callable[[str], str]
    """Base URL of the sidecar admin port (/metrics) of one workload."""
    app: Callable[[str], str]
    """Base URL of one workload's app (GET /events)."""


def warm_up(shop: ShopEndpoints, timeout: float = 30.0) -> None:
    """Until the route tables reached the sidecars: both canary targets answer."""

    def answered(headers: dict[str, str]) -> bool:
        status, _, body = http("GET", shop.gateway + "/orders-version", headers=headers)
        return status == 200 and bool(body.get("orders_version"))

    wait_until("orders v2 via the testers rule", lambda: answered({"x-canary": "always"}), timeout)
    wait_until("orders via the gateway", lambda: answered({}), timeout)


def check_chain(shop: ShopEndpoints) -> None:
    """gateway -> orders -> payments, and the order.created event published."""
    status, _, body = http("POST", shop.gateway + "/checkout", {"item": "book", "qty": 2})
    assert status == 200, body
    assert body["status"] == 201
    order = body["order"]
    assert body["orders_version"] in ("v1", "v2")
    assert order["version"] == body["orders_version"]
    assert order["charge"] == {
        "charged": True,
        "order_id": order["id"],
        "service": "payments",
        "version": "v1",
    }
    assert order["event"]["stream"]
    assert order["event"]["seq"] >= 1
    assert order["event"]["duplicate"] is False
    # The testers rule pins v2 by header.
    status, _, body = http(
        "POST", shop.gateway + "/checkout", {"item": "pen"}, headers={"x-canary": "always"}
    )
    assert status == 200, body
    assert body["orders_version"] == "v2"
    # A sidecar also resolves service.namespace hosts.
    status, _, body = http(
        "GET",
        shop.outbound("gateway") + "/version",
        headers={"host": f"orders.{shop.namespace}"},
    )
    assert status == 200, body
    assert body["service"] == "orders"


def check_denied(shop: ShopEndpoints) -> None:
    """Calls the NatsServices' permissions forbid are 403, not forwarded."""
    for caller, target in (
        ("payments", "gateway"),
        ("gateway", "payments"),
        ("inventory", "orders"),
    ):
        status, _, body = http(
            "POST", shop.outbound(caller) + "/charge", {}, headers={"host": target}
        )
        assert status == 403, (caller, target, body)
        assert body["error"] == "forbidden", body
    # An unknown service is a 404, not a 403.
    status, _, _ = http("GET", shop.outbound("gateway") + "/", headers={"host": "nosuch"})
    assert status == 404


def check_canary(shop: ShopEndpoints) -> dict[str, int]:
    """The 90/10 split over CANARY_REQUESTS requests through the gateway, within 5 points."""
    results = many(shop.gateway, "GET", "/orders-version", CANARY_REQUESTS, CANARY_CONCURRENCY)
    bad = [r for r in results if r[0] != 200]
    assert not bad, f"{len(bad)} failed, e.g. {bad[:3]}"
    versions = collections.Counter(r[2]["orders_version"] for r in results)
    assert set(versions) == {"v1", "v2"}, versions
    share_v2 = versions["v2"] / CANARY_REQUESTS
    assert 0.05 <= share_v2 <= 0.15, f"v2 got {share_v2:.1%}, expected 10% +- 5: {versions}"
    return dict(versions)


def deliveries(shop: ShopEndpoints, workload: str) -> dict[str, Any]:
    status, _, body = http("GET", shop.app(workload) + "/events")
    assert status == 200, body
    result: dict[str, Any] = body
    return result


def check_event_once(shop: ShopEndpoints) -> None:
    """order.created reaches inventory (FAIL_FIRST=1) and payments exactly once each.

    The checkout is sent twice with one order id (a client retry): the second
    publish is a duplicate the stream drops. Inventory's first delivery ever
    fails on purpose: that event is delivered twice, processed once, acked once.
    """
    order_id = f"e2e-{uuid.uuid4().hex[:10]}"
    for attempt in range(2):
        status, _, body = http(
            "POST", shop.gateway + "/checkout", {"item": "lamp", "order_id": order_id}
        )
        assert status == 200, body
        assert body["order"]["id"] == order_id
        assert body["order"]["event"]["duplicate"] is (attempt == 1)

    def processed(workload: str) -> bool:
        return order_id in deliveries(shop, workload)["processed"]

    wait_until("inventory processed the order", lambda: processed("inventory"), 20)
    wait_until("payments processed the order", lambda: processed("payments"), 20)
    # Room for a wrong redelivery to show up (inventory's first backoff is 500ms).
    time.sleep(1.5)

    for workload in ("inventory", "payments"):
        got = deliveries(shop, workload)
        mine = [d for d in got["deliveries"] if d["topic"] == "order.created"]
        by_key = collections.defaultdict(list)
        for d in mine:
            by_key[d["key"]].append(d)
        failed = [d for d in mine if d["status"] != 200]
        if workload == "inventory":
            # FAIL_FIRST=1: exactly one delivery failed, and that event came again.
            assert len(failed) == 1, mine
            again = by_key[failed[0]["key"]]
            assert [d["result"] for d in again] == ["failed on purpose", "processed"], again
            assert [d["delivery"] for d in again] == [1, 2], again
        else:
            assert not failed, mine
        # Every event processed once; no delivery after the successful one (acked once).
        for key, ds in by_key.items():
            assert [d["result"] for d in ds].count("processed") == 1, (workload, key, ds)
            assert ds[-1]["result"] == "processed", (workload, key, ds)
        assert len(by_key[order_id]) == (1 + (failed[0]["key"] == order_id if failed else 0))
        assert by_key[order_id][-1]["source"] == f"orders.{shop.namespace}"
        # The sidecar agrees: one ack per event, one nak for the failure.
        text = http_text(shop.admin(workload) + "/metrics")
        name = "natsmesh_sidecar_events_delivered_total"
        acked = metric_samples(text, name, topic="order.created", result="delivered")
        retried = metric_samples(text, name, topic="order.created", result="retry")
        assert acked == len(by_key), (workload, acked, len(by_key))
        assert retried == len(failed), (workload, retried)


def http_text(url: str) -> str:
    status, _, body = http("GET", url)
    assert status == 200, body
    assert isinstance(body, str)
    return body


def check_metrics(shop: ShopEndpoints, n: int = 5) -> None:
    """/metrics of the sidecars count the requests on both sides of NATS."""
    ns = shop.namespace
    name = "natsmesh_sidecar_requests_total"
    out_labels = {
        "direction": "outbound",
        "source": f"gateway.{ns}",
        "destination": f"orders.{ns}",
        "status": "200",
    }

    def inbound() -> float:
        total = 0.0
        for workload in ("orders", "orders-v2"):
            text = http_text(shop.admin(workload) + "/metrics")
            total += metric_samples(
                text, name, direction="inbound", source=f"gateway.{ns}", status="200"
            )
        return total

    before_out = metric_samples(http_text(shop.admin("gateway") + "/metrics"), name, **out_labels)
    before_in = inbound()
    for _ in range(n):
        status, _, body = http("GET", shop.gateway + "/orders-version")
        assert status == 200, body
    text = http_text(shop.admin("gateway") + "/metrics")
    assert metric_samples(text, name, **out_labels) == before_out + n
    assert inbound() == before_in + n
    assert "natsmesh_sidecar_request_duration_seconds_bucket" in text
    assert metric_samples(text, "natsmesh_sidecar_nats_connected") == 1


def check_chaos(shop: ShopEndpoints, batch: int = 16, batches: int = 8) -> collections.Counter[int]:
    """orders -> payments with ``x-chaos: on``: the chaos rule's faults, caller-side.

    payments-route.yaml delays half of these calls by 500 ms and aborts a
    tenth with 503, so the 5xx, latency and fault series exist. Batches of
    parallel calls until an abort was seen (0.9^16 per batch: 8 is plenty).
    """
    url = shop.outbound("orders") + "/charge"
    headers = {"host": "payments", "x-chaos": "on"}
    statuses: collections.Counter[int] = collections.Counter()
    with ThreadPoolExecutor(batch) as pool:
        for _ in range(batches):
            for status, _, _ in pool.map(
                lambda _: http("POST", url, {"order_id": "chaos"}, headers), range(batch)
            ):
                statuses[status] += 1
            if statuses[503]:
                break
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] >= 1, statuses
    return statuses


def _host_port(url: str) -> tuple[str, int]:
    hostport = url.partition("://")[2].partition("/")[0]
    host, _, port = hostport.partition(":")
    return host, int(port or 80)


def check_upload(shop: ShopEndpoints) -> None:
    """A file upload through the shop: the gateway relays a 6 MiB body to orders
    through the mesh (it streams: past one NATS message), orders hashes it."""
    body = random.Random(15).randbytes(UPLOAD_BYTES)
    conn = httpc.HTTPConnection(*_host_port(shop.gateway), timeout=30)
    try:
        conn.request("POST", "/upload", body=body, headers={"content-type": "image/png"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200, answer
    assert answer["sha256"] == hashlib.sha256(body).hexdigest(), answer
    assert answer["bytes"] == UPLOAD_BYTES
    assert answer["version"] in ("v1", "v2")


def check_order_status_feed(shop: ShopEndpoints) -> None:
    """Server-Sent Events through the shop: each status reaches the client when
    orders writes it, not when the feed ends."""
    conn = httpc.HTTPConnection(*_host_port(shop.gateway), timeout=10)
    t0 = time.monotonic()
    try:
        conn.request("GET", f"/order-status?id=o-1&n={FEED_EVENTS}&every={FEED_EVERY}")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("content-type") == "text/event-stream"
        events: list[tuple[float, dict[str, Any]]] = []
        while line := resp.readline():
            if line.startswith(b"data: "):
                events.append((time.monotonic() - t0, json.loads(line[6:])))
    finally:
        conn.close()
    statuses = [e["status"] for _, e in events]
    assert statuses == ["placed", "paid", "packed", "shipped", "delivered"], events
    assert {e["order"] for _, e in events} == {"o-1"}
    # The first event well before the last was written (0.8 s later): streamed,
    # not buffered whole (bounds wide enough for a loaded box).
    first, last = events[0][0], events[-1][0]
    assert last - first > (FEED_EVENTS - 1) * FEED_EVERY * 0.6, events


def check_websocket_echo(shop: ShopEndpoints) -> None:
    """A WebSocket through the shop: the gateway relays the upgrade to orders,
    the sidecars tunnel it; text, binary, ping and the close handshake."""
    from websockets.sync.client import connect

    host, port = _host_port(shop.gateway)
    blob = random.Random(16).randbytes(300 * 1024)  # more than two 128 KiB chunks
    with connect(f"ws://{host}:{port}/ws", open_timeout=10, compression=None) as ws:
        for i in range(20):
            ws.send(f"order {i}")
        assert [ws.recv(timeout=10) for _ in range(20)] == [f"order {i}" for i in range(20)]
        ws.send(blob)
        assert ws.recv(timeout=10) == blob
        assert ws.ping(b"are you there").wait(10)
        ws.close(code=4000, reason="done")
    assert ws.close_code == 4000


def grpc_channel(shop: ShopEndpoints, caller: str, authority: str) -> Any:
    """A grpcio channel to the sidecar of ``caller``'s pod (outbound listener, h2c)."""
    import grpc

    host, port = _host_port(shop.outbound(caller))
    options = [("grpc.default_authority", authority), ("grpc.enable_http_proxy", 0)]
    return grpc.insecure_channel(f"{host}:{port}", options=options)


def grpc_unavailable(shop: ShopEndpoints, calls: int = 3) -> None:
    """A few gRPC calls stock answers UNAVAILABLE (its ``offline`` item), from
    the gateway's pod: the gRPC errors the alert and the dashboard count."""
    import grpc

    with grpc_channel(shop, "gateway", "stock") as channel:
        level = channel.unary_unary("/shop.Stock/Level")
        for _ in range(calls):
            with pytest.raises(grpc.RpcError) as failed:
                level(b'{"item": "offline"}', timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value


def check_grpc_stock(shop: ShopEndpoints) -> None:
    """gRPC through the shop: a grpcio client in the gateway's pod (its sidecar's
    outbound listener, h2c) calls stock (``protocol: grpc``) unary and
    server-streaming; the same call from payments' pod, which stock does not
    admit, is PERMISSION_DENIED by payments' sidecar."""
    import grpc

    def channel(caller: str, authority: str) -> grpc.Channel:
        return grpc_channel(shop, caller, authority)

    def failed(call: Callable[[], Any]) -> grpc.RpcError:
        try:
            call()
        except grpc.RpcError as exc:
            return exc
        raise AssertionError("the call succeeded")

    book = json.dumps({"item": "book"}).encode()
    with channel("gateway", "stock") as gateway:
        level = gateway.unary_unary("/shop.Stock/Level")
        answer = json.loads(level(book, timeout=10))
        assert answer == {
            "item": "book",
            "level": STOCK["book"],
            "service": "stock",
            "version": "v1",
        }
        # The app's own status and message cross the mesh as it answered them.
        err = failed(lambda: level(json.dumps({"item": "piano"}).encode(), timeout=10))
        assert err.code() == grpc.StatusCode.NOT_FOUND, err
        assert err.details() == "no such item: piano", err
    # Server streaming, naming the service with its namespace: each update
    # reaches the client when stock writes it, not at the end of the call.
    with channel("gateway", f"stock.{shop.namespace}") as gateway:
        watch = gateway.unary_stream("/shop.Stock/Watch")
        request = {"item": "lamp", "n": WATCH_UPDATES, "every": WATCH_EVERY}
        t0 = time.monotonic()
        updates = [
            (time.monotonic() - t0, json.loads(m))
            for m in watch(json.dumps(request).encode(), timeout=10)
        ]
    assert [u["seq"] for _, u in updates] == list(range(WATCH_UPDATES)), updates
    assert [u["level"] for _, u in updates] == [STOCK["lamp"] - i for i in range(WATCH_UPDATES)]
    first, last = updates[0][0], updates[-1][0]
    assert last - first > (WATCH_UPDATES - 1) * WATCH_EVERY * 0.6, updates
    # The attack: the same call from a pod stock does not admit. Its own
    # sidecar refuses it with gRPC's status for it, not an HTTP page.
    with channel("payments", "stock") as payments:
        err = failed(lambda: payments.unary_unary("/shop.Stock/Level")(book, timeout=10))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    trailers = dict(err.trailing_metadata() or ())
    assert trailers.get("x-natsmesh-error") == "forbidden", trailers
