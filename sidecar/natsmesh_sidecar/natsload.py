"""nats-py without aiohttp, unless a websocket URL needs it.

nats-py imports aiohttp when it is first imported, only for its websocket
transport: about 10 MB of RSS and 0.15-0.4 s of CPU, a third of the start of
a ``natsmesh`` user command and a large part of a sidecar's. The sidecar and
the user commands call :func:`without_websocket_transport` before their first
``import nats``; a connection to a ``ws://``/``wss://`` server that comes
later (a URL read from the cluster, say) calls
:func:`websocket_transport_for` first, which brings the transport back.
A process that already imported aiohttp (the operator: kopf uses it) is left
as it is.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

logger = logging.getLogger(__name__)


def is_websocket(url: str) -> bool:
    return url.strip().lower().startswith(("ws://", "wss://"))


def without_websocket_transport() -> None:
    """Keep aiohttp out of the process (call before nats-py is imported).

    ``None`` in ``sys.modules`` makes ``import aiohttp`` raise ImportError,
    which nats.aio.transport handles by disabling only its websocket transport.
    """
    if "nats.aio.transport" not in sys.modules:
        sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]


def websocket_transport_for(servers: Iterable[str]) -> None:
    """Before connecting: if a server is a websocket URL and aiohttp was kept
    out, import it and hand it to nats-py's transport module (which looks it
    up as a module global when a websocket transport is created)."""
    if not any(is_websocket(s) for s in servers):
        return
    if sys.modules.get("aiohttp", False) is not None:
        return  # never blocked (or already imported)
    del sys.modules["aiohttp"]
    import aiohttp
    import nats.aio.transport as transport

    transport.aiohttp = aiohttp  # type: ignore[attr-defined,unused-ignore]
    logger.debug("websocket server given: the websocket transport is loaded")
