"""gRPC across namespaces: ``web`` in ``front`` calls ``orders`` in ``shop``.

Each namespace is its own NATS account; ``orders`` admits ``web`` and no one
else from ``front``. Every call kind is carried by the cross-namespace
streams (the callee's first answer on the unary import's ``_R_`` reply, the
rest on the ``Stream`` import the caller's first credit opens), with
messages over one NATS message both ways. ``spy``, in ``front`` too but not
admitted, gets UNIMPLEMENTED ("no service"): its account imports nothing
from ``shop``, so to its sidecar ``orders.shop`` does not exist (a caller
learns of another namespace's services only by being admitted), beside
web's calls that work. After the
calls, ``shop``'s account holds no reply mapping: each stream closed its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest
import pytest_asyncio

from natsmesh_operator.wiring.desired import CallerRef, ServiceIntent
from tests.fixtures.nats_operator import OperatorNats, start_operator_nats
from tests.integration.grpc.grpc_harness import MIB, OPTIONS, AppState, method, start_app
from tests.integration.stream.stream_harness import SidecarProc, start_sidecar, stop_sidecar

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


def tenants() -> list[ServiceIntent]:
    return [
        ServiceIntent("front", "web", allow_same_namespace=False),
        ServiceIntent("front", "spy", allow_same_namespace=False),
        ServiceIntent(
            "shop",
            "orders",
            allow_same_namespace=False,
            allowed_callers=(CallerRef("web", "front"),),
        ),
    ]


@dataclass
class Mesh:
    on: OperatorNats
    state: AppState
    sides: dict[str, SidecarProc]

    def channel(self, name: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            f"127.0.0.1:{self.sides[name].listen_port}",
            options=[
                *OPTIONS,
                ("grpc.default_authority", "orders.shop"),
                ("grpc.enable_http_proxy", 0),
            ],
        )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    workdir = tmp_path_factory.mktemp("grpc-xns")
    on = start_operator_nats(workdir)
    sides: dict[str, SidecarProc] = {}
    state = AppState("r0")
    server, app_port = await start_app(state)
    try:
        creds = await on.apply_namespaces(tenants())

        def side(name: str, ns: str, port: int = 0) -> asyncio.Future[SidecarProc]:
            dirname = workdir / name
            dirname.mkdir()
            (workdir / f"{name}.creds").write_text(creds[name])
            env = {
                "NATSMESH_NAMESPACE": ns,
                "NATSMESH_CREDS_FILE": str(workdir / f"{name}.creds"),
                "NATSMESH_TABLE_FILE": "",  # the table from the route KV, as a pod's
            }
            if port:
                env["NATSMESH_APP_PROTOCOL"] = "grpc"
            return asyncio.ensure_future(
                start_sidecar(name, on.url, dirname, app_port=port, env=env)
            )

        starts = {
            "orders": side("orders", "shop", app_port),
            "web": side("web", "front"),
            "spy": side("spy", "front"),
        }
        for name, result in zip(
            starts, await asyncio.gather(*starts.values(), return_exceptions=True), strict=True
        ):
            if isinstance(result, BaseException):
                raise result
            sides[name] = result
        yield Mesh(on, state, sides)
    finally:
        for proc in sides.values():
            stop_sidecar(proc)
        await server.stop(None)
        on.server.stop()


async def test_every_call_kind_across_namespaces(mesh: Mesh) -> None:
    big = bytes(range(256)) * (3 * MIB // 256) + b"tail"
    async with mesh.channel("web") as channel:
        call = channel.unary_unary(method("Echo"))(big, metadata=(("x-meta", "m1"),), timeout=10)
        assert await call == big
        assert dict(await call.initial_metadata())["x-head"] == "m1"
        assert dict(await call.trailing_metadata())["x-trail-bin"] == b"\x00\x01\xff"

        counted = [m async for m in channel.unary_stream(method("Count"))(b"5:700000", timeout=10)]
        assert [m[:2] for m in counted] == [b"0:", b"1:", b"2:", b"3:", b"4:"]
        assert all(len(m) == 700000 for m in counted)

        async def upload() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"u" * 600000

        assert await channel.stream_unary(method("Sum"))(upload(), timeout=10) == b"4:2400000"

        chat = channel.stream_stream(method("Chat"))(timeout=10)
        for word in (b"one", b"two", b"three"):
            await chat.write(word)
            assert await chat.read() == b"re:" + word
        await chat.done_writing()
        assert await chat.read() is grpc.aio.EOF
        assert await chat.code() == grpc.StatusCode.OK

        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await channel.unary_unary(method("Echo"))(b"fail", timeout=10)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Each stream released the reply mapping it opened in the caller's direction.
    assert await mesh.on.reply_mappings_settle("shop", 0) == 0


async def test_a_caller_not_admitted_across_namespaces_is_denied(mesh: Mesh) -> None:
    before = mesh.state.calls
    async with mesh.channel("spy") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await channel.unary_unary(method("Echo"))(b"hi", timeout=5)
    assert denied.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "no service orders.shop" in (denied.value.details() or "")
    # The admitted caller beside it works, and the app never saw the spy.
    async with mesh.channel("web") as channel:
        assert await channel.unary_unary(method("Who"))(b"", timeout=5) == b"r0"
    assert mesh.state.calls == before + 1


async def test_deadline_across_namespaces_cancels_the_app(mesh: Mesh) -> None:
    mesh.state.cancelled.clear()
    async with mesh.channel("web") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await channel.unary_unary(method("Slow"))(b"", timeout=0.5)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(mesh.state.cancelled.wait(), 5)
