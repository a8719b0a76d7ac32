"""Streamed bodies end to end: an aiohttp app, two sidecar processes, curl.

The app is written with a common framework (aiohttp), not our own HTTP
code: uploads are hashed as they are read, downloads written in pieces
(Content-Length or chunked), Server-Sent Events one per interval, and an
endless stream that notes when its client went away. The sidecars run as
``python -m natsmesh_sidecar`` processes, so their RSS is their own.
``python -m tests.integration.stream.stream_harness --port N`` serves the
app alone (bench/stream.py runs it so).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fixtures.nats_server import free_port
from tests.integration.sidecar.sidecar_harness import destination, request, table

#: The downloads' bytes: one pseudo-random MiB, repeated.
BLOCK = random.Random(15).randbytes(1024 * 1024)


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    full, rest = divmod(n, len(BLOCK))
    for _ in range(full):
        h.update(BLOCK)
    h.update(BLOCK[:rest])
    return h.hexdigest()


@dataclass
class AppState:
    #: Set when the endless stream's client went away.
    endless_closed: asyncio.Event = field(default_factory=asyncio.Event)
    uploads: int = 0


async def _upload(request: web.Request) -> web.Response:
    h = hashlib.sha256()
    n = 0
    async for chunk in request.content.iter_any():
        h.update(chunk)
        n += len(chunk)
    request.app[STATE].uploads += 1
    return web.json_response(
        {"sha256": h.hexdigest(), "bytes": n, "te": request.headers.get("transfer-encoding", "")}
    )


async def _download(request: web.Request) -> web.StreamResponse:
    n = int(request.match_info["n"])
    resp = web.StreamResponse(headers={"content-type": "application/octet-stream"})
    if "chunked" in request.query:
        resp.enable_chunked_encoding()
    else:
        resp.content_length = n
    await resp.prepare(request)
    sent = 0
    while sent < n:
        part = BLOCK[: min(len(BLOCK), n - sent)]
        await resp.write(part)
        sent += len(part)
    await resp.write_eof()
    return resp


async def _upload_503(request: web.Request) -> web.Response:
    """Reads the whole body, then fails: a retry would have to send it again."""
    await _upload(request)
    return web.json_response({"error": "unavailable"}, status=503)


async def _broken(request: web.Request) -> web.StreamResponse:
    """Announces ``n`` bytes, sends half, drops the connection."""
    n = int(request.match_info["n"])
    resp = web.StreamResponse(headers={"content-type": "application/octet-stream"})
    resp.content_length = n
    await resp.prepare(request)
    await resp.write(BLOCK[: n // 2])
    await asyncio.sleep(0.2)
    assert request.transport is not None
    request.transport.abort()
    return resp


async def _sse(request: web.Request) -> web.StreamResponse:
    count = int(request.query.get("n", "3"))
    every = float(request.query.get("every", "1"))
    resp = web.StreamResponse(
        headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
    )
    await resp.prepare(request)
    for i in range(count):
        await resp.write(f"id: {i}\ndata: event {i}\n\n".encode())
        if i < count - 1:
            await asyncio.sleep(every)
    await resp.write_eof()
    return resp


async def _endless(request: web.Request) -> web.StreamResponse:
    """A tick every 50 ms until writing fails (the client, through the mesh, left)."""
    state: AppState = request.app[STATE]
    resp = web.StreamResponse(headers={"content-type": "text/plain"})
    await resp.prepare(request)
    try:
        for _ in range(20 * 60):
            await resp.write(b"tick\n")
            await asyncio.sleep(0.05)
    except (ConnectionError, asyncio.CancelledError):
        state.endless_closed.set()
        raise
    return resp


STATE = web.AppKey("state", AppState)


def make_app(state: AppState) -> web.Application:
    app = web.Application(client_max_size=1024**4)
    app[STATE] = state
    app.router.add_post("/upload", _upload)
    app.router.add_post("/upload-503", _upload_503)
    app.router.add_get("/broken/{n}", _broken)
    app.router.add_get("/download/{n}", _download)
    app.router.add_get("/sse", _sse)
    app.router.add_get("/endless", _endless)
    return app


async def start_app(state: AppState, port: int = 0) -> tuple[web.AppRunner, int]:
    return await run_app(make_app(state), port)


async def run_app(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on 127.0.0.1 (``port``, or a free one): its runner and port."""
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port or free_port())
    await site.start()
    return runner, site._port


@dataclass
class SidecarProc:
    proc: subprocess.Popen[bytes]
    listen_port: int
    admin_port: int

    @property
    def pid(self) -> int:
        return self.proc.pid


async def start_sidecar(
    service: str,
    nats_url: str,
    workdir: Path,
    *,
    app_port: int = 0,
    rule: dict[str, Any] | None = None,
    rules: list[dict[str, Any]] | None = None,
    env: Mapping[str, str] | None = None,
) -> SidecarProc:
    """``python -m natsmesh_sidecar`` for ``service`` of namespace shop; ready when it returns.

    Without an app it is a caller of orders (with ``rule``'s settings, or
    ``rules``, in order)."""
    if app_port:
        t = table("shop", service)
    else:
        orders = destination("shop", "orders", **(rule or {}))
        if rules is not None:
            each = tuple(destination("shop", "orders", **r).rules[0] for r in rules)
            orders = orders.model_copy(update={"rules": each})
        t = table("shop", service, destinations=[orders])
    table_file = workdir / f"{service}.json"
    table_file.write_bytes(t.to_json())
    listen_port, admin_port = free_port(), free_port()
    full_env = {
        **os.environ,
        "NATSMESH_SERVICE": service,
        "NATSMESH_NAMESPACE": "shop",
        "NATSMESH_NATS_URL": nats_url,
        "NATSMESH_APP_PORT": str(app_port or 1),
        "NATSMESH_READY_CHECK": "tcp" if app_port else "none",
        "NATSMESH_LISTEN_PORT": str(listen_port),
        "NATSMESH_ADMIN_HOST": "127.0.0.1",
        "NATSMESH_ADMIN_PORT": str(admin_port),
        "NATSMESH_TABLE_FILE": str(table_file),
        "NATSMESH_DRAIN_SECONDS": "0.2",
        **(env or {}),
    }
    log = workdir / f"{service}.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any traffic
            [sys.executable, "-m", "natsmesh_sidecar"],
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    side = SidecarProc(proc, listen_port, admin_port)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar {service} exited: {log.read_text()}")
        try:
            if (await request(admin_port, "GET", "/readyz")).status == 200:
                return side
        except OSError:
            pass
        await asyncio.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"sidecar {service} not ready")


def stop_sidecar(side: SidecarProc) -> None:
    if side.proc.poll() is None:
        side.proc.terminate()
        try:
            side.proc.wait(10)
        except subprocess.TimeoutExpired:
            side.proc.kill()
            side.proc.wait()


def serve_alone(start: Callable[[int], Awaitable[tuple[web.AppRunner, int]]]) -> None:
    """``--port N``: serve the app ``start(port)`` starts until killed (for bench/)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port

    async def main() -> None:
        runner, _ = await start(port)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())


if __name__ == "__main__":
    serve_alone(lambda port: start_app(AppState(), port))


@dataclass
class Mesh:
    """An aiohttp app behind orders' sidecar, and web's sidecar calling it."""

    state: AppState
    app_port: int
    caller: SidecarProc
    callee: SidecarProc
    workdir: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.caller.listen_port}{path}"


@contextlib.asynccontextmanager
async def running_mesh(
    nats_url: str,
    workdir: Path,
    *,
    rule: dict[str, Any] | None = None,
    rules: list[dict[str, Any]] | None = None,
    **env: str,
) -> AsyncIterator[Mesh]:
    state = AppState()
    runner, app_port = await start_app(state)
    started = await asyncio.gather(
        start_sidecar("orders", nats_url, workdir, app_port=app_port, env=env),
        start_sidecar("web", nats_url, workdir, rule=rule, rules=rules, env=env),
        return_exceptions=True,
    )
    sides = [s for s in started if isinstance(s, SidecarProc)]
    try:
        for failed in started:
            if isinstance(failed, BaseException):
                raise failed
        yield Mesh(state, app_port, sides[1], sides[0], workdir)
    finally:
        for side in sides:
            stop_sidecar(side)
        await runner.cleanup()


async def curl(
    *args: str, within: float = 60, host: str = "orders.shop"
) -> tuple[int, bytes, bytes]:
    """curl (Debian's) through the caller's sidecar: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-H",
        f"Host: {host}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, out, err
