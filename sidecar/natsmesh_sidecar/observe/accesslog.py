"""One JSON line per request on stdout (logger ``natsmesh_sidecar.access``).

Built with string formatting rather than ``json.dumps``: this runs per request
and most values need no escaping; only strings that might need it go through
the JSON encoder.
"""

from __future__ import annotations

import json
import logging
import sys
import time

logger = logging.getLogger("natsmesh_sidecar.access")

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:@ ")


def _q(value: str) -> str:
    if len(value) < 80 and all(c in _SAFE for c in value):
        return '"' + value + '"'
    return json.dumps(value)


def line(
    *,
    request_id: str,
    direction: str,
    source: str,
    destination: str,
    route: str,
    method: str,
    path: str,
    status: int,
    duration_s: float,
    attempts: int = 1,
    error: str = "",
    grpc_status: str = "",
) -> str:
    """The line; ``grpcStatus`` (a number) only on a gRPC call's."""
    grpc = f',"grpcStatus":{int(grpc_status)}' if grpc_status else ""
    return (
        f'{{"ts":{time.time():.3f},"requestId":{_q(request_id)},"direction":"{direction}",'
        f'"source":{_q(source)},"destination":{_q(destination)},"route":{_q(route)},'
        f'"method":{_q(method)},"path":{_q(path)},"status":{status},'
        f'"durationMs":{duration_s * 1000.0:.3f},"attempts":{attempts},"error":{_q(error)}'
        f"{grpc}}}"
    )


def log(**fields: object) -> None:
    if logger.isEnabledFor(logging.INFO):
        logger.info(line(**fields))  # type: ignore[arg-type]


class _StdoutHandler(logging.Handler):
    """Writes the message only, to whatever ``sys.stdout`` is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(record.getMessage() + "\n")
        except Exception:
            self.handleError(record)


def setup(enabled: bool) -> None:
    """Access lines go raw to stdout, independent of the root log format."""
    logger.propagate = False
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        logger.addHandler(_StdoutHandler())
