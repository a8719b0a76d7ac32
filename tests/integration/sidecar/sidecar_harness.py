"""Test and bench harness: a small HTTP app, a raw HTTP client and route-table builders.

The app and the client are raw asyncio + httptools so neither is the
bottleneck in ``bench/sidecar.py`` and both behave exactly as written (no
framework rewriting headers).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import httptools

from natsmesh_sidecar import subjects
from natsmesh_sidecar.config import (
    Delivery,
    Destination,
    MeshTable,
    Publication,
    Rule,
    SidecarSettings,
    WeightedDestination,
)

logger = logging.getLogger(__name__)


@dataclass
class AppRequest:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


@dataclass
class AppReply:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


Handler = Callable[[AppRequest], Awaitable[AppReply]]


class _AppProtocol(asyncio.Protocol):
    def __init__(self, app: TestApp) -> None:
        self.app = app
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[AppRequest] = collections.deque()
        self.busy = False
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        self.transport = cast(asyncio.Transport, transport)
        self.app.connections += 1
        self.app.transports.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.app.transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        req = AppRequest(
            self.parser.get_method().decode(),
            self._url.decode("latin-1"),
            self._headers,
            b"".join(self._body),
        )
        self.queue.append(req)
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self.queue:
                req = self.queue.popleft()
                self.app.requests.append(req)
                reply = self.app.fast(req) if self.app.fast else None
                if reply is None:
                    reply = await self.app.handler(req)
                head = [b"HTTP/1.1 %d X\r\n" % reply.status]
                for k, v in reply.headers:
                    head.append(f"{k}: {v}\r\n".encode("latin-1"))
                head.append(b"content-length: %d\r\n\r\n" % len(reply.body))
                if self.transport is None or self.transport.is_closing():
                    return
                self.transport.write(b"".join(head) + (b"" if req.method == "HEAD" else reply.body))
        finally:
            self.busy = False


async def echo(req: AppRequest) -> AppReply:
    """Default behaviour: echo the request as JSON, with a few switchable paths."""
    path = req.path.split("?", 1)[0]
    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        return AppReply(
            code, [("content-type", "text/plain"), ("x-app", "status")], f"status {code}".encode()
        )
    if path.startswith("/sleep/"):
        await asyncio.sleep(int(path.rsplit("/", 1)[1]) / 1000.0)
        return AppReply(200, [], b"slept")
    body = json.dumps(
        {
            "method": req.method,
            "path": req.path,
            "headers": req.headers,
            "body": req.body.decode("latin-1"),
        }
    ).encode()
    return AppReply(200, [("content-type", "application/json"), ("x-app", "echo")], body)


class TestApp:
    """An HTTP/1.1 app on 127.0.0.1 that records what it got."""

    __test__ = False

    def __init__(
        self, handler: Handler = echo, fast: Callable[[AppRequest], AppReply | None] | None = None
    ) -> None:
        self.handler = handler
        self.fast = fast
        self.requests: list[AppRequest] = []
        self.connections = 0
        self.transports: set[asyncio.Transport] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> TestApp:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _AppProtocol(self), "127.0.0.1", port)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for t in list(self.transports):
                t.close()
            await self.server.wait_closed()


# -- client ------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> dict[str, object]:
        out = json.loads(self.body)
        assert isinstance(out, dict)
        return out


class _ClientProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiters: collections.deque[asyncio.Future[Response]] = collections.deque()
        self.closed = asyncio.get_running_loop().create_future()
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self.head = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_exception(ConnectionError("connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            while self.waiters:
                w = self.waiters.popleft()
                if not w.done():
                    w.set_exception(exc)

    def on_message_begin(self) -> None:
        self._headers = []
        self._body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self.head:
            self._done()
            self.parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._done()

    def _done(self) -> None:
        if self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(
                    Response(self.parser.get_status_code(), self._headers, b"".join(self._body))
                )


class Client:
    """A keep-alive HTTP/1.1 client connection; ``send`` writes raw bytes."""

    def __init__(self, proto: _ClientProtocol) -> None:
        self.proto = proto

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> Client:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(_ClientProtocol, host, port)
        return cls(proto)

    def send_raw(self, data: bytes, expect: int = 1) -> list[asyncio.Future[Response]]:
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(expect)]
        self.proto.waiters.extend(futs)
        assert self.proto.transport is not None
        self.proto.transport.write(data)
        return futs

    async def request(
        self,
        method: str,
        target: str,
        *,
        host: str = "orders",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        wait: float = 10.0,
    ) -> Response:
        self.proto.head = method == "HEAD"
        (fut,) = self.send_raw(render(method, target, host=host, headers=headers, body=body))
        return await asyncio.wait_for(fut, wait)

    def close(self) -> None:
        if self.proto.transport is not None:
            self.proto.transport.close()


def render(
    method: str,
    target: str,
    *,
    host: str = "orders",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for k, v in headers or []:
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def request(port: int, method: str, target: str, **kw: object) -> Response:
    c = await Client.open(port)
    try:
        return await c.request(method, target, **kw)  # type: ignore[arg-type]
    finally:
        c.close()


# -- tables and settings -------------------------------------------------------


def destination(
    namespace: str, service: str, *, versions: dict[str, int] | None = None, **rule: object
) -> Destination:
    versions = versions or {subjects.DEFAULT_VERSION: 100}
    dests = tuple(
        WeightedDestination(
            version=v, weight=w, subject=subjects.request_subject(namespace, service, v)
        )
        for v, w in versions.items()
    )
    return Destination(
        namespace=namespace,
        service=service,
        rules=(Rule.model_validate({"destinations": dests, **rule}),),
    )


def table(
    namespace: str,
    service: str,
    *,
    destinations: list[Destination] | None = None,
    known: tuple[str, ...] = (),
    publishes: tuple[str, ...] = (),
    subscriptions: tuple[Delivery, ...] = (),
) -> MeshTable:
    return MeshTable(
        namespace=namespace,
        service=service,
        known=known,
        destinations={subjects.host_of(d.namespace, d.service): d for d in destinations or []},
        publishes={
            t: Publication(
                topic=t,
                subject=subjects.event_subject(namespace, service, t),
                stream=subjects.stream_name(service),
            )
            for t in publishes
        },
        subscriptions=subscriptions,
    ).with_generation()


def settings(
    service: str, namespace: str, nats_url: str, app_port: int = 1, **kw: object
) -> SidecarSettings:
    return SidecarSettings.model_validate(
        {
            "service": service,
            "namespace": namespace,
            "nats_url": nats_url,
            "app_port": app_port,
            "listen_port": 0,
            "admin_port": 0,
            "admin_host": "127.0.0.1",
            "drain_seconds": 5.0,
            # A caller without an app (port 1) serves nothing: no app to wait for.
            "ready_check": "none" if app_port == 1 else "tcp",
            **kw,
        }
    )
