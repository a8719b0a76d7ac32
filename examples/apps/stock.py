"""The shop's gRPC service: stock levels over gRPC, a ``grpcio`` server.

    python -m examples.apps.stock
    python examples/apps/stock.py

Service ``shop.Stock`` on ``$HOST:$PORT`` (default ``0.0.0.0:9090``), HTTP/2
cleartext as gRPC servers in a pod are; its NatsService says ``protocol:
grpc`` so the sidecar calls it over HTTP/2. Messages are JSON in raw bytes
through a generic handler, so no protobuf and no generated code (a client
passes bytes too)::

    /shop.Stock/Level  unary             {"item": "book"}
                                         -> {"item", "level", "service", "version"}
    /shop.Stock/Watch  server streaming  {"item": "book", "n": 3, "every": 0.1}
                                         -> n x {"item", "level", "seq"}, ``every`` s apart

An unknown item is the app's own NOT_FOUND (a mesh error is never NOT_FOUND,
docs/architecture.md "gRPC"); a request that is not such JSON is
INVALID_ARGUMENT. Unlike shop.py this needs ``grpcio`` (PyPI), which the
standard-library-only example image does not have: the kind flavour of the e2e
tier does not run it (examples/shop/grpc/README.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

log = logging.getLogger("stock")

SERVICE = "shop.Stock"
LEVELS = {"book": 12, "pen": 40, "lamp": 3}
#: Bounds on a Watch: a client cannot hold the server for long.
MAX_UPDATES, MAX_EVERY = 100, 5.0


async def _request(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, Any]:
    """The JSON request with a known ``item``, or the call aborted with the reason."""
    try:
        body = json.loads(raw)
        item = body["item"]
    except (ValueError, TypeError, KeyError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, 'want JSON {"item": ...}')
    if item == "offline":
        # A failure on demand, as the shop's HTTP apps have (FAIL_FIRST): a
        # retryable status for the error-rate alert and dashboard to count.
        await context.abort(grpc.StatusCode.UNAVAILABLE, "warehouse offline")
    if item not in LEVELS:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no such item: {item}")
    result: dict[str, Any] = body
    return result


async def level(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    body = await _request(raw, context)
    item = body["item"]
    answer = {
        "item": item,
        "level": LEVELS[item],
        "service": "stock",
        "version": os.environ.get("VERSION", "v1"),
    }
    return json.dumps(answer).encode()


async def watch(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    body = await _request(raw, context)
    item = body["item"]
    try:
        n = max(1, min(MAX_UPDATES, int(body.get("n", 3))))
        every = max(0.0, min(MAX_EVERY, float(body.get("every", 0.1))))
    except (TypeError, ValueError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "n and every are numbers")
    for seq in range(n):
        if seq:
            await asyncio.sleep(every)
        # A level that moves, so each update is its own message.
        yield json.dumps({"item": item, "level": LEVELS[item] - seq, "seq": seq}).encode()


def handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Level": grpc.unary_unary_rpc_method_handler(level),
            "Watch": grpc.unary_stream_rpc_method_handler(watch),
        },
    )


async def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s stock %(message)s")
    address = f"{os.environ.get('HOST', '0.0.0.0')}:{int(os.environ.get('PORT', '9090'))}"
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler(),))
    server.add_insecure_port(address)
    await server.start()
    log.info("serving %s on %s", SERVICE, address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Calls in flight get a moment to finish, as the sidecar's drain does.
    await server.stop(2.0)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
