"""``python -m natsmesh_sidecar`` / ``natsmesh sidecar``: run one sidecar from NATSMESH_* env.

Memory is a target (DESIGN.md): nats-py imports aiohttp only for its websocket
transport (about 10 MB RSS). The sidecar talks plain TCP/TLS to NATS, so unless
the URL is ``ws://`` the import is blocked before nats is first imported; so
is ``importlib.metadata``, which nats-py imports only to learn its version.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

from natsmesh_sidecar import natsload

if TYPE_CHECKING:
    from natsmesh_sidecar.app import Sidecar

logger = logging.getLogger("natsmesh_sidecar")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _block_websocket_deps(nats_url: str) -> None:
    if not any(natsload.is_websocket(url) for url in nats_url.split(",")):
        natsload.without_websocket_transport()


def _import_nats_without_metadata() -> None:
    """Import nats-py without ``importlib.metadata`` (1.5 MB of RSS).

    nats.aio.client asks ``importlib.metadata`` for its own version at import,
    only to name it in CONNECT, and that import drags in zipfile, csv, bz2,
    lzma, tempfile and importlib.resources, which the sidecar never uses.
    Blocked for that one import (nats-py falls back to "0.0.0"), the version
    is then read from the installed distribution's directory name instead.
    A later import of ``importlib.metadata`` (someone else's) works as usual.
    """
    if "importlib.metadata" in sys.modules or "nats.aio.client" in sys.modules:
        return
    sys.modules["importlib.metadata"] = None  # type: ignore[assignment]
    try:
        import nats.aio.client as client
    finally:
        del sys.modules["importlib.metadata"]
    # .../site-packages/nats/aio/client.py -> .../site-packages
    site = os.path.dirname(os.path.dirname(os.path.dirname(client.__file__ or "")))
    for entry in os.listdir(site or "."):
        name, _, rest = entry.partition("-")
        if name == "nats_py" and rest.endswith(".dist-info"):
            client.__version__ = rest.removesuffix(".dist-info")
            break


def _trim_heap() -> None:
    """Hand back to the OS what import-time work freed.

    About 1 MB of RSS on glibc; a no-op elsewhere.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _quiet_gc() -> None:
    """Keep the cyclic garbage collector off the request path.

    Every request allocates a few dozen container objects (almost all freed by
    reference counting), so the default threshold (700) ran a collection every
    few requests, and each full one walked every module and class loaded at
    start. Those live as long as the process: frozen, the collector never
    scans them again, and it runs a tenth as often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


def _arguments(argv: list[str]) -> tuple[str, bool]:
    """(log level, access log off), from the environment unless given on the command line.

    The injected container passes no arguments: argparse (and the gettext it
    imports, 0.3 MB of RSS) is loaded only when there are some.
    """
    log_level = os.environ.get("NATSMESH_LOG_LEVEL", "info")
    no_access_log = os.environ.get("NATSMESH_ACCESS_LOG", "1") in ("0", "false", "no")
    if not argv:
        return log_level, no_access_log
    import argparse

    parser = argparse.ArgumentParser(prog="natsmesh sidecar", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=log_level)
    parser.add_argument(
        "--no-access-log",
        action="store_true",
        default=no_access_log,
        help="disable the per-request JSON access log",
    )
    args = parser.parse_args(argv)
    return str(args.log_level), bool(args.no_access_log)


def main(argv: list[str] | None = None) -> int:
    log_level, no_access_log = _arguments(sys.argv[1:] if argv is None else argv)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=log_level.upper(), handlers=[handler], force=True)

    _block_websocket_deps(os.environ.get("NATSMESH_NATS_URL", ""))
    _import_nats_without_metadata()
    from natsmesh_sidecar.app import Sidecar
    from natsmesh_sidecar.wire import Settings

    try:
        settings = Settings.from_env()
    except ValueError as exc:
        logger.error("invalid NATSMESH_* settings: %s", exc)
        return 2
    _trim_heap()
    try:
        sidecar = Sidecar(
            settings,
            access_log=not no_access_log,
            header_timeout=float(os.environ.get("NATSMESH_HEADER_TIMEOUT_SECONDS", "10")),
        )
    except ValueError as exc:
        # e.g. an OTLP endpoint that is not an http(s) URL
        logger.error("invalid NATSMESH_* settings: %s", exc)
        return 2
    _quiet_gc()
    try:
        import uvloop

        return int(uvloop.run(_serve(sidecar)))
    except ImportError:
        return asyncio.run(_serve(sidecar))


async def _serve(sidecar: Sidecar) -> int:
    """Run the sidecar; once it is ready, trim the heap again.

    Connecting (TLS, the JWT, the first subscriptions and table) leaves
    about 1.5 MB of freed heap that glibc keeps until told otherwise.
    """
    run = asyncio.ensure_future(sidecar.run())
    ready = asyncio.ensure_future(sidecar.wait_ready(60.0))
    await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and not ready.cancelled() and ready.exception() is None:
        _trim_heap()
    ready.cancel()
    return await run


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
