"""The shop's demo app: one tiny HTTP service, four roles.

    python -m examples.apps.shop gateway|orders|payments|inventory
    python examples/apps/shop.py orders

Standard library only (asyncio), so the image is a bare Python. It listens on
``$PORT`` (default 8080) and makes every mesh call through its sidecar, the
outbound proxy at ``$NATSMESH_OUTBOUND`` or ``$HTTP_PROXY`` (default
``http://127.0.0.1:15001``), naming the destination service in the Host header.

Roles:

* ``gateway``: ``POST /checkout`` calls orders ``POST /orders`` and answers
  with the order and the orders version that served it; ``GET /orders-version``
  asks orders which version answers (cheap, for the canary split).
* ``orders``: ``POST /orders`` charges the order with payments ``POST /charge``,
  publishes ``order.created`` (``POST /_events/order.created``, the order id as
  ``Idempotency-Key``) and answers 201 ``{id, version}``.
* ``payments``: ``POST /charge`` answers 200.
* ``inventory``: only events.

Streams (bodies past one NATS message, Server-Sent Events, WebSocket): the
gateway relays ``POST /upload``, ``GET /order-status`` and ``GET /ws`` byte
for byte to orders through its sidecar, where ``POST /uploads`` hashes a body
of up to 64 MiB as it arrives and answers ``{sha256, bytes, version}``,
``GET /order-status?id=&n=&every=`` streams an order's statuses as events
(``n`` of them, ``every`` seconds apart) and ``GET /ws`` echoes WebSocket
messages (text, binary, ping, close).

Every role answers ``GET /healthz``, ``GET /version``, records the events the
sidecar delivers (``POST /events/...``) and lists them at ``GET /events``.
``FAIL_FIRST=N`` makes the first N deliveries answer 500, to show redelivery;
a redelivered event that was already processed (same ``Idempotency-Key``) is
answered 200 and not processed again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger("shop")

ROLES = ("gateway", "orders", "payments", "inventory")
MAX_BODY = 1024 * 1024
#: What ``POST /uploads`` reads (hashing it as it comes, never holding it).
MAX_UPLOAD = 64 * 1024 * 1024
#: WebSocket messages echoed; larger ones close the socket (1009).
MAX_MESSAGE = 16 * 1024 * 1024
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ORDER_STATUSES = ("placed", "paid", "packed", "shipped", "delivered")
#: Gateway paths relayed to orders as they are (a stream, not one JSON body).
RELAYED = {"/upload": "/uploads", "/order-status": "/order-status", "/ws": "/ws"}
#: Bound on everything the app waits for (a call through the mesh, a read).
IO_TIMEOUT = 10.0
REASONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    101: "Switching Protocols",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
}

Headers = dict[str, str]
Reply = tuple[int, Headers, bytes]


def _json(status: int, body: Any, headers: Headers | None = None) -> Reply:
    return status, {"content-type": "application/json", **(headers or {})}, _dumps(body)


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"{}")
    except ValueError:
        return {"raw": raw.decode(errors="replace")}


# --------------------------------------------------------------------------
# HTTP/1.1 on asyncio streams: enough for the sidecar and a test client
# --------------------------------------------------------------------------


class HttpError(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, Headers] | None:
    """The start line and lower-cased headers, or None at a clean EOF."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise HttpError("truncated head") from None
    except asyncio.LimitOverrunError:
        raise HttpError("head too large") from None
    lines = raw.decode("latin-1").split("\r\n")
    headers: Headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpError(f"bad header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: Headers) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        total = 0
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # trailer end (no trailers expected)
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                raise HttpError("body too large")
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0") or "0")
    if length > MAX_BODY:
        raise HttpError("body too large")
    return await reader.readexactly(length) if length else b""


def _render(start: str, headers: Headers, body: bytes) -> bytes:
    head = [start, *(f"{k}: {v}" for k, v in headers.items()), f"content-length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class MeshClient:
    """Calls through the sidecar's outbound proxy, keeping connections alive."""

    def __init__(self, proxy: str) -> None:
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 15001
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def call(
        self, method: str, host: str, path: str, body: Any = None, headers: Headers | None = None
    ) -> tuple[int, Headers, Any]:
        """One call to ``host`` (a mesh service) through the sidecar; JSON in and out."""
        data = b"" if body is None else _dumps(body)
        hdrs = {"host": host, **(headers or {})}
        if body is not None:
            hdrs["content-type"] = "application/json"
        request = _render(f"{method} {path} HTTP/1.1", hdrs, data)
        for fresh in (False, True):
            conn = None if fresh or not self.idle else self.idle.pop()
            reused = conn is not None
            if conn is None:
                conn = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), IO_TIMEOUT
                )
            reader, writer = conn
            try:
                writer.write(request)
                await writer.drain()
                head = await asyncio.wait_for(_read_head(reader), IO_TIMEOUT)
                if head is None:
                    raise HttpError("connection closed before the response")
                status_line, rh = head
                raw = await asyncio.wait_for(_read_body(reader, rh), IO_TIMEOUT)
            except (OSError, HttpError, asyncio.IncompleteReadError) as exc:
                writer.close()
                if reused:
                    continue  # a keep-alive connection the sidecar closed: retry once fresh
                raise HttpError(f"{method} http://{host}{path}: {exc}") from exc
            if rh.get("connection", "").lower() == "close":
                writer.close()
            else:
                self.idle.append(conn)
            return int(status_line.split()[1]), rh, _loads(raw)
        raise HttpError("unreachable")

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


# --------------------------------------------------------------------------
# Streams: a relay, a hashed upload, Server-Sent Events, a WebSocket echo
# --------------------------------------------------------------------------

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close ``writer``."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


async def relay(proxy: MeshClient, start: str, headers: Headers, client: Stream) -> None:
    """Send a request to orders through the sidecar and its answer back, byte for byte.

    The body (an upload) streams as the client sends it and the answer (a
    download, events, a WebSocket after its 101) as orders writes it: the
    sidecars carry it over NATS in chunks. Ends when the sidecar closes.
    """
    up_reader, up_writer = await asyncio.wait_for(
        asyncio.open_connection(proxy.host, proxy.port), IO_TIMEOUT
    )
    hdrs = {**headers, "host": "orders"}
    if "upgrade" not in hdrs.get("connection", "").lower():
        hdrs["connection"] = "close"
    lines = [start, *(f"{k}: {v}" for k, v in hdrs.items())]
    up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    upload = asyncio.create_task(_pump(client[0], up_writer))
    try:
        await _pump(up_reader, client[1])
    finally:
        upload.cancel()
        up_writer.close()


async def _read_chunks(
    reader: asyncio.StreamReader, headers: Headers, limit: int
) -> AsyncIterator[bytes]:
    """The body's pieces as they arrive (Content-Length or chunked), at most ``limit`` bytes."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
            total += size
            if total > limit:
                raise HttpError("body too large")
            yield await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        return
    left = int(headers.get("content-length", "0") or "0")
    if left > limit:
        raise HttpError("body too large")
    while left:
        data = await reader.read(min(left, 256 * 1024))
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(data)
        yield data


def _answer(writer: asyncio.StreamWriter, reply: Reply) -> None:
    status, rh, data = reply
    rh["connection"] = "close"
    writer.write(_render(f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", rh, data))


async def hashed_upload(version: str, headers: Headers, client: Stream) -> None:
    """``POST /uploads``: the body's sha256 and length, read as it arrives."""
    reader, writer = client
    digest, size = hashlib.sha256(), 0
    try:
        async with asyncio.timeout(60):
            async for piece in _read_chunks(reader, headers, MAX_UPLOAD):
                digest.update(piece)
                size += len(piece)
    except HttpError:
        _answer(writer, _json(413, {"error": f"uploads are at most {MAX_UPLOAD} bytes"}))
        return
    log.info("upload of %d bytes", size)
    answer = {"sha256": digest.hexdigest(), "bytes": size, "version": version}
    _answer(writer, _json(200, answer, {"x-shop-version": version}))


async def order_status(version: str, query: dict[str, str], writer: asyncio.StreamWriter) -> None:
    """``GET /order-status``: Server-Sent Events, one per status, ``every`` seconds apart."""
    order = query.get("id", "")
    count = max(1, min(int(query.get("n", "5") or "5"), 100))
    every = max(0.0, min(float(query.get("every", "0.2") or "0.2"), 10.0))
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    for i in range(count):
        status = ORDER_STATUSES[min(i, len(ORDER_STATUSES) - 1)]
        data = _dumps({"order": order, "status": status, "seq": i, "version": version})
        event = b"id: %d\nevent: status\ndata: %s\n\n" % (i, data)
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        if i < count - 1:
            await asyncio.sleep(every)
    writer.write(b"0\r\n\r\n")


async def _ws_frame(reader: asyncio.StreamReader) -> tuple[bool, int, bytes]:
    """One frame from a client (masked): (fin, opcode, payload)."""
    b0, b1 = await reader.readexactly(2)
    size = b1 & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    elif size == 127:
        size = int.from_bytes(await reader.readexactly(8), "big")
    if size > MAX_MESSAGE:
        raise HttpError("message too large")
    mask = await reader.readexactly(4) if b1 & 0x80 else b""
    payload = await reader.readexactly(size)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bool(b0 & 0x80), b0 & 0x0F, payload


def _ws_send(writer: asyncio.StreamWriter, opcode: int, payload: bytes) -> None:
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, size))
    elif size < 1 << 16:
        head = bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big")
    writer.write(head + payload)


async def websocket_echo(headers: Headers, client: Stream) -> None:
    """``GET /ws``: every text and binary message back, pings answered, close returned."""
    reader, writer = client
    key = headers.get("sec-websocket-key", "")
    if headers.get("upgrade", "").lower() != "websocket" or not key:
        _answer(writer, _json(400, {"error": "a WebSocket upgrade is expected"}))
        return
    digest = hashlib.sha1((key + WS_GUID).encode(), usedforsecurity=False).digest()
    accept = base64.b64encode(digest)
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-accept: %s\r\n\r\n" % accept
    )
    parts: list[bytes] = []
    kind = 0
    try:
        while True:
            fin, opcode, payload = await _ws_frame(reader)
            if opcode == 0x8:  # close: the same code back, then the TCP close
                _ws_send(writer, 0x8, payload[:2])
                await writer.drain()
                return
            if opcode == 0x9:
                _ws_send(writer, 0xA, payload)
            elif opcode in (0x0, 0x1, 0x2):
                kind = opcode or kind
                parts.append(payload)
                if sum(map(len, parts)) > MAX_MESSAGE:
                    raise HttpError("message too large")
                if fin:
                    _ws_send(writer, kind, b"".join(parts))
                    parts.clear()
            await writer.drain()
    except HttpError:
        _ws_send(writer, 0x8, (1009).to_bytes(2, "big"))


# --------------------------------------------------------------------------
# The shop
# --------------------------------------------------------------------------


class Shop:
    def __init__(self, role: str, env: dict[str, str]) -> None:
        self.role = role
        self.version = env.get("VERSION", "v1")
        self.fail_first = int(env.get("FAIL_FIRST", "0") or "0")
        proxy = env.get("NATSMESH_OUTBOUND") or env.get("HTTP_PROXY") or "http://127.0.0.1:15001"
        self.mesh = MeshClient(proxy)
        self.deliveries: list[dict[str, Any]] = []
        """Every delivery the sidecar made, in order, with the status we answered."""
        self.processed: dict[str, dict[str, Any]] = {}
        """Events processed, by Idempotency-Key: each exactly once."""
        self.failed = 0
        self.requests = 0

    async def handle(self, method: str, path: str, headers: Headers, body: bytes) -> Reply:
        self.requests += 1
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return 200, {"content-type": "text/plain"}, b"ok\n"
        if path == "/version" and method == "GET":
            return _json(200, self._me(), {"x-shop-version": self.version})
        if path == "/events" and method == "GET":
            return _json(200, {"deliveries": self.deliveries, "processed": self.processed})
        if path.startswith("/events/") and method == "POST":
            return self._event(path, headers, body)
        name = f"{self.role}_{method.lower()}_{path.strip('/').replace('-', '_')}"
        route = getattr(self, name, None)
        if route is None:
            return _json(404, {"error": f"{self.role} has no {method} {path}"})
        result: Reply = await route(headers, _loads(body))
        return result

    async def stream(self, start: str, headers: Headers, client: Stream) -> bool:
        """Serve a streaming request (its body not yet read); False if it is not one."""
        method, target, *_ = [*start.split(" "), "", ""]
        url = urlsplit(target)
        if self.role == "gateway" and url.path in RELAYED:
            path = RELAYED[url.path] + (f"?{url.query}" if url.query else "")
            await relay(self.mesh, f"{method} {path} HTTP/1.1", headers, client)
        elif self.role == "orders" and (method, url.path) == ("POST", "/uploads"):
            await hashed_upload(self.version, headers, client)
        elif self.role == "orders" and (method, url.path) == ("GET", "/order-status"):
            await order_status(self.version, dict(parse_qsl(url.query)), client[1])
        elif self.role == "orders" and (method, url.path) == ("GET", "/ws"):
            await websocket_echo(headers, client)
        else:
            return False
        self.requests += 1
        return True

    def _me(self) -> dict[str, str]:
        return {"service": self.role, "version": self.version}

    def _event(self, path: str, headers: Headers, body: bytes) -> Reply:
        key = headers.get("idempotency-key", "")
        record = {
            "path": path,
            "topic": headers.get("nm-event-topic", ""),
            "source": headers.get("nm-event-source", ""),
            "key": key,
            "delivery": int(headers.get("nm-event-delivery", "0") or "0"),
            "at": round(time.time(), 3),
        }
        if self.failed < self.fail_first:
            self.failed += 1
            self.deliveries.append({**record, "status": 500, "result": "failed on purpose"})
            log.info("event %s %s: failing delivery on purpose (FAIL_FIRST)", record["topic"], key)
            return _json(500, {"error": "FAIL_FIRST"})
        if key in self.processed:
            self.deliveries.append({**record, "status": 200, "result": "duplicate"})
            return _json(200, {"duplicate": True})
        self.processed[key] = {**record, "body": _loads(body)}
        self.deliveries.append({**record, "status": 200, "result": "processed"})
        log.info("event %s %s processed", record["topic"], key)
        return _json(200, {"processed": True})

    # -- gateway ----------------------------------------------------------

    async def gateway_post_checkout(self, headers: Headers, body: Any) -> Reply:
        fwd: Headers = {k: headers[k] for k in ("x-canary", "x-request-id") if k in headers}
        order = {"item": body.get("item", "book"), "qty": body.get("qty", 1)}
        # A client retrying a checkout sends the same order id: one order, one event.
        order_id = body.get("order_id") or headers.get("idempotency-key")
        if order_id:
            order["id"] = str(order_id)
        status, rh, answer = await self.mesh.call("POST", "orders", "/orders", order, fwd)
        reply = {
            "status": status,
            "orders_version": rh.get("x-shop-version") or answer.get("version"),
            "order": answer,
        }
        return _json(200 if status == 201 else 502, reply)

    async def gateway_get_orders_version(self, headers: Headers, body: Any) -> Reply:
        fwd: Headers = {k: headers[k] for k in ("x-canary",) if k in headers}
        status, rh, answer = await self.mesh.call("GET", "orders", "/version", None, fwd)
        reply = {"status": status, "orders_version": rh.get("x-shop-version"), "answer": answer}
        return _json(200 if status == 200 else 502, reply)

    # -- orders -----------------------------------------------------------

    async def orders_post_orders(self, headers: Headers, body: Any) -> Reply:
        order_id = str(body.get("id") or uuid.uuid4().hex[:12])
        order = {"id": order_id, "item": body.get("item"), "qty": body.get("qty", 1)}
        status, _, charge = await self.mesh.call(
            "POST", "payments", "/charge", {"order_id": order_id, "amount": 10 * order["qty"]}
        )
        if status != 200:
            return _json(502, {"error": "payment failed", "payments": {"status": status, **charge}})
        status, _, event = await self.mesh.call(
            "POST",
            "orders",  # any host: /_events/ is the sidecar's own
            "/_events/order.created",
            {**order, "version": self.version},
            {"idempotency-key": order_id},
        )
        if status != 202:
            failed = {"error": "event not published", "events": {"status": status, **event}}
            return _json(502, failed)
        return _json(
            201,
            {**order, "version": self.version, "charge": charge, "event": event},
            {"x-shop-version": self.version},
        )

    # -- payments ---------------------------------------------------------

    async def payments_post_charge(self, headers: Headers, body: Any) -> Reply:
        return _json(200, {"charged": True, "order_id": body.get("order_id"), **self._me()})


async def serve_connection(
    shop: Shop, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            head = await _read_head(reader)
            if head is None:
                return
            start, headers = head
            if await shop.stream(start, headers, (reader, writer)):
                await writer.drain()
                return  # a stream ends its connection
            method, target, *_ = [*start.split(" "), "", ""]
            body = await asyncio.wait_for(_read_body(reader, headers), IO_TIMEOUT)
            try:
                status, rh, data = await shop.handle(method, target, headers, body)
            except HttpError as exc:
                status, rh, data = _json(502, {"error": str(exc)})
            except Exception as exc:
                log.exception("%s %s failed", method, target)
                status, rh, data = _json(500, {"error": type(exc).__name__})
            close = headers.get("connection", "").lower() == "close"
            if close:
                rh["connection"] = "close"
            writer.write(_render(f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", rh, data))
            await writer.drain()
            if close:
                return
    except (HttpError, ValueError, TimeoutError) as exc:
        with contextlib.suppress(OSError):
            writer.write(_render("HTTP/1.1 400 Bad Request", {"connection": "close"}, b""))
        log.info("bad request: %s", exc)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main(role: str) -> int:
    shop = Shop(role, dict(os.environ))
    port = int(os.environ.get("PORT", "8080"))
    # In a pod every interface is the pod's own (the kubelet probes the pod IP).
    host = os.environ.get("HOST", "0.0.0.0")
    server = await asyncio.start_server(
        lambda r, w: serve_connection(shop, r, w), host, port, backlog=1024
    )
    log.info("shop %s %s listening on %s:%d", role, shop.version, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    shop.mesh.close()
    log.info("shop %s stopped after %d requests", role, shop.requests)
    return 0


def cli(argv: list[str]) -> int:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if len(argv) != 1 or argv[0] not in ROLES:
        print(f"usage: shop.py {{{'|'.join(ROLES)}}}", file=sys.stderr)
        return 2
    return asyncio.run(main(argv[0]))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
