"""gRPC's few wire rules the mesh needs: deadlines, statuses, trailers on NATS.

Pure functions, unit-tested (tests/unit/sidecar/test_grpcwire.py):

* :func:`timeout_seconds`: the ``grpc-timeout`` header (``1-8 digits`` and a
  unit, ``H M S m u n``);
* :func:`status_of`: a mesh refusal (HTTP status and error code) as a gRPC
  status code. gRPC's own HTTP-to-gRPC table (doc/http-grpc-status-mapping.md
  of grpc/grpc) is the base, refined where the mesh knows more: our 504 is a
  deadline, not "unavailable";
* :func:`encode_trailers` / :func:`decode_trailers`: the app's HTTP/2
  trailers as one NATS header (``Nm-Trailers``) on a stream's last message;
* :func:`message`: a ``grpc-message`` value (percent-encoded, as the spec asks);
* :func:`status_value`: a ``grpc-status`` value as a status code (a metric label's value).
"""

from __future__ import annotations

import logging
import urllib.parse

logger = logging.getLogger(__name__)

#: The NATS header that carries a response's trailers on its last message
#: (the last chunk, or a head that ends the stream).
H_TRAILERS = "Nm-Trailers"

OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16
DATA_LOSS = 15
#: The status codes gRPC defines (0 OK to 16 UNAUTHENTICATED).
_CODES = frozenset(str(n) for n in range(17))
#: A server's own failure, gRPC's 5xx: what the circuit breaker, the error-rate
#: panel and alert count (charts/natsmesh/files). The rest is the server's
#: answer about the request (NOT_FOUND, INVALID_ARGUMENT...), UNIMPLEMENTED
#: included: a method nobody serves is the caller's mistake, as a 404 is.
SERVER_ERRORS = frozenset({UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS})

_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}

#: HTTP status -> gRPC status, for a refusal the mesh (or the callee's
#: sidecar) answered: gRPC's HTTP table, except 504 (our timeout) and 499.
_BY_HTTP = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    # An unknown service or method is what a gRPC server answers UNIMPLEMENTED,
    # and what gRPC clients make of an HTTP 404 from a proxy.
    404: UNIMPLEMENTED,
    413: RESOURCE_EXHAUSTED,
    429: UNAVAILABLE,
    499: CANCELLED,
    500: INTERNAL,
    501: UNIMPLEMENTED,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}
#: Mesh error codes whose gRPC status is not their HTTP status's.
_BY_CODE = {
    "timeout": DEADLINE_EXCEEDED,
    "app_timeout": DEADLINE_EXCEEDED,
    "payload_too_large": RESOURCE_EXHAUSTED,
    "client_closed": CANCELLED,
}


def is_grpc(content_type: str | None) -> bool:
    """Whether a request is a gRPC call (``application/grpc``, ``application/grpc+proto``...)."""
    return content_type is not None and content_type[:16].lower() == "application/grpc"


def timeout_seconds(value: str | None) -> float | None:
    """A ``grpc-timeout`` in seconds; None when absent or malformed (no deadline)."""
    if not value or len(value) < 2 or len(value) > 9:
        return None
    digits, unit = value[:-1], value[-1]
    if not digits.isascii() or not digits.isdigit() or unit not in _UNITS:
        return None
    return int(digits) * _UNITS[unit]


def status_of(http_status: int, code: str = "") -> int:
    """The gRPC status of a call the mesh answered with ``http_status`` and error ``code``."""
    found = _BY_CODE.get(code)
    if found is not None:
        return found
    if 200 <= http_status < 300:
        # A mesh answer is never a 2xx without trailers: nothing says OK.
        return UNKNOWN
    return _BY_HTTP.get(http_status, UNKNOWN)


def status_value(value: str | None) -> int:
    """A ``grpc-status`` value as a code: anything but 0-16 (absent, garbled,
    an app's own number) is UNKNOWN, as gRPC clients take it; so a label
    made of it has at most 17 values."""
    if value is not None and value in _CODES:
        return int(value)
    return UNKNOWN


def status_in(headers: list[tuple[str, str]]) -> int | None:
    """The ``grpc-status`` among (lower-case) headers or trailers, None if none."""
    for name, value in headers:
        if name == "grpc-status":
            return status_value(value)
    return None


def message(text: str) -> str:
    """``text`` as a ``grpc-message`` value: UTF-8, percent-encoded outside
    printable ASCII (and ``%`` itself)."""
    return urllib.parse.quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


def encode_trailers(trailers: list[tuple[str, str]]) -> str:
    """Trailers as one NATS header value: a query string (no CR, LF or ``:`` issues)."""
    return urllib.parse.urlencode(trailers, quote_via=urllib.parse.quote)


def decode_trailers(value: str) -> list[tuple[str, str]]:
    """What :func:`encode_trailers` made, names lower-cased (HTTP/2 asks for it)."""
    return [(k.lower(), v) for k, v in urllib.parse.parse_qsl(value, keep_blank_values=True)]
