"""gRPC through the mesh: ``grpcio`` servers behind real sidecars, a ``grpcio`` client.

Neither end is our code: the app is a ``grpc.aio`` server, the client a
``grpc.aio`` channel to web's outbound listener with ``orders.shop`` as its
authority. Messages are raw bytes (generic handlers, no serializers), so no
protobuf code generation is needed. The mesh is an operator-mode nats-server
with a tenant and a NatsRoute applied by the operator's wiring code:
``web`` may call ``orders`` (three replicas, each an app and a sidecar with
``NATSMESH_APP_PROTOCOL=grpc``) and ``ghost`` (no instance at all);
``evil`` may call nobody. The route retries ``/test.Echo/Retry*`` on
UNAVAILABLE and nothing gRPC of ``/test.Echo/Write``; those methods answer
UNAVAILABLE while the replicas' shared :class:`Flaky` budget lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.desired import CallerRef, ServiceIntent
from natsmesh_operator.wiring.plan import plan
from natsmesh_operator.wiring.routes import RouteDestination, RouteIntent, RouteRule
from natsmesh_sidecar.config import Match, Retries
from tests.fixtures.nats_operator import OperatorNats, start_operator_nats
from tests.fixtures.nats_server import free_port
from tests.integration.stream.stream_harness import SidecarProc, start_sidecar, stop_sidecar

NS = "shop"
SERVICE = "test.Echo"
REPLICAS = 3
#: The route's rule for ``/test.Echo/Slow``: shorter than the default 5 s.
SLOW_TIMEOUT_MS = 1000
MIB = 1024 * 1024
#: Big messages both ways (gRPC's default limit is 4 MiB).
OPTIONS = [
    ("grpc.max_send_message_length", 16 * MIB),
    ("grpc.max_receive_message_length", 16 * MIB),
]


#: What the retried rule and the not-retried one say (backoff short: tests are quick).
RETRIED = Retries.model_validate(
    {"attempts": 2, "grpcRetryOn": [14], "backoffBaseMs": 10, "backoffMaxMs": 20}
)
NOT_RETRIED = Retries.model_validate({"attempts": 2, "backoffBaseMs": 10, "backoffMaxMs": 20})


@dataclass
class Flaky:
    """Shared by the replicas: the next ``left`` calls of the flaky methods, on
    whichever replica, answer UNAVAILABLE (trailers-only, as a server shedding load)."""

    left: int = 0
    #: Calls of the flaky methods, by replica, failed or not.
    seen: list[str] = field(default_factory=list)


@dataclass
class AppState:
    replica: str
    calls: int = 0
    #: Request metadata of the last call, as the app saw it.
    metadata: dict[str, str | bytes] = field(default_factory=dict)
    #: Set when a call was cancelled (the client's cancel, a deadline, the mesh's cut).
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    #: What the app saw as its deadline (seconds left at the call's start).
    time_remaining: float | None = None


class EchoApp:
    """The test service's methods, on raw bytes."""

    def __init__(self, state: AppState, flaky: Flaky) -> None:
        self.state = state
        self.flaky = flaky

    async def _shed(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.flaky.seen.append(self.state.replica)
        if self.flaky.left > 0:
            self.flaky.left -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.state.replica} is shedding")

    async def flaky_read(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """Unary, UNAVAILABLE while the budget lasts: the replica that answered."""
        await self._shed(context)
        return self.state.replica.encode()

    async def flaky_upload(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """Client streaming: reads it all, then UNAVAILABLE while the budget lasts."""
        total = 0
        async for message in requests:
            total += len(message)
        await self._shed(context)
        return b"%d" % total

    def _seen(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.state.calls += 1
        self.state.metadata = {k: v for k, v in context.invocation_metadata() or ()}
        self.state.time_remaining = context.time_remaining()

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """Unary: the request back; ``fail`` aborts; metadata echoed both ways."""
        self._seen(context)
        if request == b"fail":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "bad request ✓ 100%",
                trailing_metadata=(("x-why", "because"),),
            )
        meta = dict(context.invocation_metadata() or ())
        await context.send_initial_metadata((("x-head", str(meta.get("x-meta", ""))),))
        context.set_trailing_metadata((("x-trail", "end"), ("x-trail-bin", b"\x00\x01\xff")))
        return request

    async def who(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self._seen(context)
        return self.state.replica.encode()

    async def count(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """Server streaming: ``n:size`` -> n messages of ``size`` bytes."""
        self._seen(context)
        n, size = (int(x) for x in request.split(b":"))
        for i in range(n):
            yield (b"%d:" % i).ljust(size, b"x")

    async def sum(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """Client streaming: how many messages and bytes came."""
        self._seen(context)
        n = total = 0
        async for message in requests:
            n += 1
            total += len(message)
        return b"%d:%d" % (n, total)

    async def chat(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """Bidirectional: each message answered as it comes."""
        self._seen(context)
        async for message in requests:
            yield b"re:" + message

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """Never answers in time: notes its cancel."""
        self._seen(context)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.state.cancelled.set()
            raise
        return b"late"

    async def ticks(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """A tick every 50 ms until cancelled."""
        self._seen(context)
        try:
            for i in range(1200):
                yield b"tick %d" % i
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.state.cancelled.set()
            raise


def handler(state: AppState, flaky: Flaky) -> grpc.GenericRpcHandler:
    app = EchoApp(state, flaky)
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "RetryRead": grpc.unary_unary_rpc_method_handler(app.flaky_read),
            "RetryUpload": grpc.stream_unary_rpc_method_handler(app.flaky_upload),
            "Write": grpc.unary_unary_rpc_method_handler(app.flaky_read),
            "Echo": grpc.unary_unary_rpc_method_handler(app.echo),
            "Who": grpc.unary_unary_rpc_method_handler(app.who),
            "Count": grpc.unary_stream_rpc_method_handler(app.count),
            "Sum": grpc.stream_unary_rpc_method_handler(app.sum),
            "Chat": grpc.stream_stream_rpc_method_handler(app.chat),
            "Slow": grpc.unary_unary_rpc_method_handler(app.slow),
            "Ticks": grpc.unary_stream_rpc_method_handler(app.ticks),
        },
    )


async def start_app(state: AppState, flaky: Flaky | None = None) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((handler(state, flaky or Flaky()),))
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    return server, port


def tenant() -> list[ServiceIntent]:
    """web may call orders and ghost (never running); evil may call nobody."""
    return [
        ServiceIntent(NS, "web", allow_same_namespace=False),
        ServiceIntent(NS, "evil", allow_same_namespace=False),
        ServiceIntent(
            NS, "orders", allow_same_namespace=False, allowed_callers=(CallerRef("web"),)
        ),
        ServiceIntent(NS, "ghost", allow_same_namespace=False, allowed_callers=(CallerRef("web"),)),
    ]


def route() -> RouteIntent:
    """``/test.Echo/Slow`` has a 1 s timeout; the rest the default rule's 5 s.
    ``Retry*`` is retried on UNAVAILABLE; ``Write`` has retries, but lists no gRPC status."""
    return RouteIntent(
        NS,
        "orders",
        rules=(
            RouteRule(
                name="retried",
                destinations=(RouteDestination("v1"),),
                match=Match.model_validate({"pathPrefix": f"/{SERVICE}/Retry"}),
                timeout_ms=5000,
                retries=RETRIED,
            ),
            RouteRule(
                name="writes",
                destinations=(RouteDestination("v1"),),
                match=Match.model_validate({"pathPrefix": f"/{SERVICE}/Write"}),
                timeout_ms=5000,
                retries=NOT_RETRIED,
            ),
            RouteRule(
                name="slow",
                destinations=(RouteDestination("v1"),),
                match=Match.model_validate({"pathPrefix": f"/{SERVICE}/Slow"}),
                timeout_ms=SLOW_TIMEOUT_MS,
            ),
            RouteRule(name="rest", destinations=(RouteDestination("v1"),), timeout_ms=5000),
        ),
    )


async def applied(on: OperatorNats) -> dict[str, str]:
    p = plan(tenant(), [route()])
    assert not p.problems, p.problems
    async with on.applier() as a:
        report = await a.apply(p)
        assert report.ok, report.errors
    account = on.keyring.account(NS)
    return {
        name: users.issue(p.user(NS, name), account, ttl_seconds=3600).creds
        for name in ("web", "evil", "orders")
    }


@dataclass
class GrpcMesh:
    states: list[AppState]
    sides: dict[str, SidecarProc]
    flaky: Flaky = field(default_factory=Flaky)

    def port(self, name: str = "web") -> int:
        return self.sides[name].listen_port

    def channel(self, name: str = "web", authority: str = "orders.shop") -> grpc.aio.Channel:
        """One HTTP/2 connection to a sidecar's outbound listener, naming ``authority``."""
        return grpc.aio.insecure_channel(
            f"127.0.0.1:{self.port(name)}",
            options=[
                *OPTIONS,
                ("grpc.default_authority", authority),
                # The test process may have HTTP_PROXY set: the sidecar is the proxy.
                ("grpc.enable_http_proxy", 0),
            ],
        )

    def reset(self) -> None:
        for state in self.states:
            state.calls = 0
            state.cancelled.clear()
        self.flaky.left = 0
        self.flaky.seen.clear()


def request_headers(path: str) -> list[tuple[str, str]]:
    """A gRPC request's HEADERS to orders, for a client by hand (``h2``)."""
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "orders.shop"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


@contextlib.asynccontextmanager
async def running_grpc_mesh(
    on: OperatorNats,
    workdir: Path,
    replicas: int = REPLICAS,
    *,
    app_ports: Sequence[int] = (),
    **env: str,
) -> AsyncIterator[GrpcMesh]:
    """The tenant applied, ``replicas`` orders replicas (app + sidecar), web's and
    evil's sidecars.

    ``app_ports``: the orders replicas' apps are these, already listening
    (one replica each), instead of ``grpcio`` servers of ours.
    """
    creds = await applied(on)
    for name, text in creds.items():
        (workdir / f"{name}.creds").write_text(text)
    states = [] if app_ports else [AppState(f"r{i}") for i in range(replicas)]
    flaky = Flaky()
    apps = [await start_app(state, flaky) for state in states]
    ports = list(app_ports) or [port for _, port in apps]
    mesh = GrpcMesh(states, {}, flaky)

    def side(name: str, service: str, app_port: int = 0) -> Any:
        dirname = workdir / name
        dirname.mkdir(exist_ok=True)
        extra = {
            "NATSMESH_CREDS_FILE": str(workdir / f"{service}.creds"),
            "NATSMESH_TABLE_FILE": "",
            **env,
        }
        if app_port:
            extra["NATSMESH_APP_PROTOCOL"] = "grpc"
        return start_sidecar(service, on.url, dirname, app_port=app_port, env=extra)

    starts = {f"orders-{i}": side(f"orders-{i}", "orders", port) for i, port in enumerate(ports)}
    starts |= {"web": side("web", "web"), "evil": side("evil", "evil")}
    started = await asyncio.gather(*starts.values(), return_exceptions=True)
    try:
        for name, result in zip(starts, started, strict=True):
            if isinstance(result, BaseException):
                raise result
            mesh.sides[name] = result
        yield mesh
    finally:
        for proc in mesh.sides.values():
            stop_sidecar(proc)
        for server, _ in apps:
            await server.stop(None)


@contextlib.asynccontextmanager
async def grpc_mesh(workdir: Path, replicas: int = REPLICAS, **env: str) -> AsyncIterator[GrpcMesh]:
    """:func:`running_grpc_mesh` on an operator-mode nats-server of its own."""
    on = start_operator_nats(workdir)
    try:
        async with running_grpc_mesh(on, workdir, replicas, app_ports=(), **env) as mesh:
            yield mesh
    finally:
        on.server.stop()


def method(name: str) -> str:
    """The test service's method ``name`` as a gRPC path."""
    return f"/{SERVICE}/{name}"
