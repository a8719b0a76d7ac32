"""HTTP <-> NATS mapping: which headers travel, how status and errors come back.

A request crosses the mesh as one NATS message whose headers carry the HTTP
method, target and headers and whose payload is the body; the reply carries the
status in ``Nm-Status`` and the response headers. Mesh-owned headers use the
``Nm-`` prefix; callers cannot set them (the outbound side strips them) so the
``Nm-Source`` a server sees is the one its peer sidecar wrote.

nats-py keeps headers in a ``dict[str, str]``: multi-valued HTTP headers would
collapse, so every repeat of a name travels as ``Nm-Dup-<n>-<name>``; and a few
names mean something to NATS itself (``Status``, ``Description``, ``Nats-*``)
so an app header with such a name travels escaped as ``Nm-Esc-<name>``.

Strings are decoded as latin-1 on the HTTP side: nats-py encodes header values
as UTF-8 and decodes them back, so every HTTP byte survives the round trip.
Everything here runs per request: no JSON, no regex except to validate untrusted
names on the way into the app.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

H_METHOD = "Nm-Method"
H_TARGET = "Nm-Target"
H_SOURCE = "Nm-Source"
H_STATUS = "Nm-Status"
H_ERROR = "Nm-Error"
H_TIMEOUT = "Nm-Timeout-Ms"
#: On a callee's 502: its app refused the connection, nothing was delivered
#: (so any replica may be tried, whatever the method).
H_UNDELIVERED = "Nm-Undelivered"
#: A request head whose body streams, or a reply whose response does
#: (natsmesh_sidecar.transport.stream.protocol.H_STREAM, checked here without importing it).
H_STREAM = "Nm-Stream"
#: A streamed request's method, in place of ``Nm-Method``: a sidecar that
#: knows nothing of streams answers 400 instead of calling its app with an
#: empty body.
H_STREAM_METHOD = "Nm-Stream-Method"
#: On a streamed request's head: an HTTP Upgrade to tunnel (its value the
#: protocol, only ``websocket``; natsmesh_sidecar.transport.stream.tunnel).
H_UPGRADE = "Nm-Upgrade"
#: On a request head, when the caller's route rule sets them (NatsRoute
#: ``stream``): the window the callee grants a streamed request body and
#: the idle timeout of the call's stream, which both ends must share
#: (natsmesh_sidecar.transport.stream.protocol.limits_of).
H_STREAM_WINDOW = "Nm-Window"
H_STREAM_IDLE = "Nm-Idle-Ms"
_STREAM_WINDOW_B = H_STREAM_WINDOW.encode()
_STREAM_IDLE_B = H_STREAM_IDLE.encode()
DUP_PREFIX = "Nm-Dup-"
ESC_PREFIX = "Nm-Esc-"
MESH_PREFIX_LOWER = "nm-"

REQUEST_ID = "X-Request-Id"
TRACEPARENT = "traceparent"

#: Connection-scoped headers never forwarded (RFC 9110 7.6.1); the length is
#: recomputed on each hop because the body is re-framed.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
#: Names with a meaning inside NATS (nats-py treats ``Status: 503`` as "no
#: responders"), so app headers with these names are escaped.
NATS_RESERVED = frozenset({"status", "description"})

_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: A header block in which every line passes :func:`valid_header`: a value
#: cannot hold CR or LF, so each line's end is unambiguous.
_VALID_BLOCK_RE = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")

REASONS: dict[int, str] = {
    100: "Continue",
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    418: "I'm a teapot",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


_REASONS = {status: text.encode() for status, text in REASONS.items()}


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


#: The statuses a reply may carry: final ones only. A 1xx written as a final
#: answer has no Content-Length, so its "body" would be read by the app's
#: client as the answers to its next requests on the keep-alive connection.
FINAL_STATUS_MIN = 200
FINAL_STATUS_MAX = 599


#: "200" .. "599": the texts :func:`final_status` takes, and their statuses.
_FINAL_TEXT = {str(n): n for n in range(FINAL_STATUS_MIN, FINAL_STATUS_MAX + 1)}


def final_status(value: object) -> int | None:
    """The final HTTP status ``value`` names (``Nm-Status`` text or an int), else None.

    Anything but three ASCII digits in 200-599 is refused: ``int()`` alone
    would take " 200", "+200", "2_00" and non-ASCII digits.
    """
    # Plain str and int (what every reply and app response carries): one lookup.
    if value.__class__ is str:
        return _FINAL_TEXT.get(value)
    if value.__class__ is int:
        return value if FINAL_STATUS_MIN <= value <= FINAL_STATUS_MAX else None
    if isinstance(value, int) and not isinstance(value, bool):
        status = value
    elif isinstance(value, str) and len(value) == 3 and value.isascii() and value.isdigit():
        status = int(value)
    else:
        return None
    return status if FINAL_STATUS_MIN <= status <= FINAL_STATUS_MAX else None


def escape_name(name: str) -> str:
    """The NATS header key for an app header ``name`` (first occurrence)."""
    low = name.lower()
    if low in NATS_RESERVED or low.startswith("nats-") or low.startswith(MESH_PREFIX_LOWER):
        return ESC_PREFIX + name
    return name


def http_to_nats(
    headers: Iterable[tuple[str, str]], out: dict[str, str] | None = None
) -> dict[str, str]:
    """Map forwardable HTTP headers into a NATS header dict (repeats kept)."""
    out = {} if out is None else out
    seen: dict[str, int] | None = None
    for name, value in headers:
        key = escape_name(name)
        if key in out:
            # Rare: a repeated header. Count per name so each gets its own key.
            seen = {} if seen is None else seen
            n = seen.get(key, 1)
            seen[key] = n + 1
            key = f"{DUP_PREFIX}{n}-{key}"
        out[key] = value
    return out


#: App header name -> its NATS key (:func:`escape_name`): the same few names
#: come with every request. Bounded: names come from clients and apps.
_KEYS: dict[str, str] = {}
_KEYS_MAX = 4096
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def nats_lines(headers: Sequence[tuple[str, str]]) -> str:
    """``http_to_nats(headers)`` as the lines of a NATS header block.

    What ``natsfast.encode_headers`` writes for that dict, less its first
    line and the blank line that ends it, without building the dict: names
    are escaped from a cache, and repeats and values holding CR or LF (both
    rare) take the dict's way.
    """
    if not headers:
        return ""
    keys = _KEYS
    lines = []
    for name, value in headers:
        key = keys.get(name)
        if key is None:
            key = escape_name(name)
            if len(keys) >= _KEYS_MAX:
                keys.clear()
            keys[name] = key
        lines.append(f"{key}: {value}\r\n")
    text = "".join(lines)
    n = len(lines)
    # A repeated name is a repeated key (escape_name maps names one to one).
    if text.count("\n") == n and text.count("\r") == n and (n == 1 or len(dict(headers)) == n):
        return text
    out = []
    for key, value in http_to_nats(headers).items():
        if "\r" in value or "\n" in value:
            value = value.translate(_NEWLINES)
        out.append(f"{key}: {value}\r\n")
    return "".join(out)


def nats_to_http(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The app-level headers of a NATS message, mesh headers removed."""
    out: list[tuple[str, str]] = []
    for key, value in headers.items():
        if key[:3] in ("Nm-", "nm-", "NM-"):
            if key.startswith(ESC_PREFIX):
                out.append((key[len(ESC_PREFIX) :], value))
            elif key.startswith(DUP_PREFIX):
                rest = key[len(DUP_PREFIX) :]
                _, _, name = rest.partition("-")
                if name.startswith(ESC_PREFIX):
                    name = name[len(ESC_PREFIX) :]
                if name:
                    out.append((name, value))
            continue
        out.append((key, value))
    return out


#: NATS header key -> what :func:`http_block` does with it (cached: the same
#: few keys come with every message; bounded: keys come from peers).
_KINDS: dict[str, int] = {}
_KINDS_MAX = 4096
_LEFT_OUT, _APP, _HOST, _ESCAPED = 0, 1, 2, 3


def _kind(key: str) -> int:
    kind = _KINDS.get(key)
    if kind is None:
        if key[:3] in ("Nm-", "nm-", "NM-"):
            # As nats_to_http: these two prefixes are case-sensitive.
            escaped = key.startswith(ESC_PREFIX) or key.startswith(DUP_PREFIX)
            kind = _ESCAPED if escaped else _LEFT_OUT
        else:
            low = key.lower()
            kind = _LEFT_OUT if low in HOP_BY_HOP else _HOST if low == "host" else _APP
        if len(_KINDS) >= _KINDS_MAX:
            _KINDS.clear()
        _KINDS[key] = kind
    return kind


def http_block(
    headers: Mapping[str, str], extra: Sequence[tuple[str, str]] = ()
) -> tuple[bytes, bool]:
    """``_header_block(nats_to_http(headers) + extra)``: a NATS message's app
    headers as an HTTP block, and whether it names the host.

    One pass over the message's headers, no list in between; escaped and
    repeated names (``Nm-Esc-``, ``Nm-Dup-``), ``extra`` headers (a request
    id the caller did not send) and a block the one regex refuses take the
    general way.
    """
    lines = []
    has_host = False
    kinds = _KINDS
    for key, value in headers.items():
        kind = kinds.get(key)
        if kind is None:
            kind = _kind(key)
        if kind:  # not _LEFT_OUT, the mesh's own headers
            if kind == _ESCAPED:
                return _header_block([*nats_to_http(headers), *extra])
            if kind == _HOST:
                has_host = True
            lines.append(f"{key}: {value}\r\n")
    block = "".join(lines).encode("latin-1", "replace")
    if not extra and _VALID_BLOCK_RE.fullmatch(block) is not None:
        return block, has_host
    return _header_block([*nats_to_http(headers), *extra])


def valid_header(name: bytes, value: bytes) -> bool:
    """Whether a header from an untrusted message can be written to HTTP safely."""
    return _TOKEN_RE.fullmatch(name) is not None and _BAD_VALUE_RE.search(value) is None


def valid_method(method: str) -> bool:
    return (
        0 < len(method) <= 32
        and _TOKEN_RE.fullmatch(method.encode("latin-1", "replace")) is not None
    )


class _RandomHex:
    """Random hex digits from the OS CSPRNG, read 4 KiB at a time.

    A request id and a traceparent took three ``getrandom`` system calls per
    request; these values are identifiers, not secrets, and a buffer of
    ``os.urandom`` output is exactly as random. (The sidecar never forks, so
    no two processes share a buffer.)
    """

    __slots__ = ("_hex", "_pos")

    SIZE = 4096

    def __init__(self) -> None:
        self._hex = ""
        self._pos = 0

    def take(self, digits: int) -> str:
        pos = self._pos
        end = pos + digits
        if end > len(self._hex):
            self._hex = os.urandom(self.SIZE).hex()
            pos, end = 0, digits
        self._pos = end
        return self._hex[pos:end]


_random_hex = _RandomHex().take


def new_request_id() -> str:
    """A random (version 4) UUID string; ``str(uuid.uuid4())`` costs about 3x more."""
    h = _random_hex(32)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


#: RFC 4122 variant bits (10xx) on the first hex digit of the fourth group.
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def next_traceparent(incoming: str | None) -> str:
    """W3C traceparent for the next hop: same trace, new span (parent) id.

    A missing or malformed header starts a new sampled trace.
    """
    if incoming is not None and len(incoming) >= 55:
        parts = incoming.split("-")
        if (
            len(parts) >= 4
            and len(parts[0]) == 2
            and parts[0] != "ff"
            and len(parts[1]) == 32
            and len(parts[2]) == 16
            and len(parts[3]) == 2
            and _is_hex(parts[1])
            and _is_hex(parts[3])
            and parts[1] != "0" * 32
        ):
            return f"00-{parts[1]}-{_random_hex(16)}-{parts[3]}"
    h = _random_hex(48)
    return f"00-{h[:32]}-{h[32:]}-01"


def _is_hex(value: str) -> bool:
    try:
        int(value, 16)
    except ValueError:
        return False
    return value == value.lower()


def error_body(error: str, message: str, request_id: str) -> bytes:
    # Error path only: JSON is fine here.
    return json.dumps({"error": error, "message": message, "requestId": request_id}).encode()


def render_response(
    status: int,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    keep_alive: bool,
    head: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response with a recomputed Content-Length.

    Headers come from other services and apps: one whose name is not a token
    or whose value holds CR, LF, NUL or another control byte is dropped, so
    nothing a callee sends can end the header block or start a second
    response. Only final statuses are written (:func:`final_status`).
    """
    if final_status(status) is None:
        raise ValueError(f"refusing to write status {status} as a final response")
    block, _ = _header_block(headers if isinstance(headers, list) else list(headers))
    return render_block_response(status, block, body, keep_alive, head)


def render_block_response(
    status: int, block: bytes, body: bytes, keep_alive: bool, head: bool
) -> bytes:
    """:func:`render_response` with the header block made and the status checked."""
    if status == 204 or status == 304:
        return b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (
            status,
            reason(status),
            block,
            b"" if keep_alive else b"connection: close\r\n",
        )
    return b"HTTP/1.1 %d %s\r\n%scontent-length: %d\r\n%s\r\n%s" % (
        status,
        reason(status),
        block,
        len(body),
        b"" if keep_alive else b"connection: close\r\n",
        b"" if head else body,
    )


def _header_block(headers: Sequence[tuple[str, str]]) -> tuple[bytes, bool]:
    """The forwardable headers as one HTTP block, and whether it names the host.

    Hop-by-hop headers are left out; a header whose name is not a token or
    whose value holds a control byte is dropped (:func:`valid_header`). One
    regex over the whole block is the common case; the per-header check
    runs only when the block fails it.
    """
    lines = []
    has_host = False
    for name, value in headers:
        low = name.lower()
        if low in HOP_BY_HOP:
            continue
        if low == "host":
            has_host = True
        lines.append(f"{name}: {value}\r\n")
    block = "".join(lines).encode("latin-1", "replace")
    if _VALID_BLOCK_RE.fullmatch(block) is not None:
        return block, has_host
    # Some header is unsafe: find it and drop only it.
    out, has_host = [], False
    for name, value in headers:
        n = name.encode("latin-1", "replace")
        v = value.encode("latin-1", "replace")
        low = name.lower()
        if low in HOP_BY_HOP:
            continue
        if not valid_header(n, v):
            logger.debug("dropping invalid header %r", n)
            continue
        if low == "host":
            has_host = True
        out.append(b"%s: %s\r\n" % (n, v))
    return b"".join(out), has_host


def render_request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    host: str,
) -> bytes | None:
    """An HTTP/1.1 request to the app, or None when the input is not safe to send."""
    line = _request_line(method, target)
    if line is None:
        return None
    return _request(line, method, *_header_block(headers), body, host)


def render_request_from_nats(
    method: str,
    target: str,
    headers: Mapping[str, str],
    extra: Sequence[tuple[str, str]],
    body: bytes,
    host: str,
) -> bytes | None:
    """``render_request(method, target, nats_to_http(headers) + extra, ...)``.

    See :func:`http_block`.
    """
    line = _request_line(method, target)
    if line is None:
        return None
    return _request(line, method, *http_block(headers, extra), body, host)


def render_request_head_from_nats(
    method: str,
    target: str,
    headers: Mapping[str, str],
    extra: Sequence[tuple[str, str]],
    host: str,
    length: int | None,
) -> bytes | None:
    """The head of a request whose body follows in pieces (a streamed body):
    ``content-length`` when ``length`` is known, else chunked."""
    line = _request_line(method, target)
    if line is None:
        return None
    block, has_host = http_block(headers, extra)
    host_line = b"" if has_host else b"host: %s\r\n" % host.encode()
    framing = (
        b"transfer-encoding: chunked\r\n" if length is None else b"content-length: %d\r\n" % length
    )
    return b"%s%s%s%s\r\n" % (line, block, host_line, framing)


#: Methods seen valid (bounded: they come from callers).
_METHODS: set[str] = set()


def _request_line(method: str, target: str) -> bytes | None:
    """``METHOD TARGET HTTP/1.1``, or None for a method or target not safe to write."""
    if method not in _METHODS:
        if not valid_method(method):
            return None
        if len(_METHODS) < 256:
            _METHODS.add(method)
    t = target.encode("latin-1", "replace")
    if not t.startswith(b"/") or _BAD_VALUE_RE.search(t) is not None or b" " in t:
        return None
    return b"%s %s HTTP/1.1\r\n" % (method.encode("latin-1", "replace"), t)


def _request(
    line: bytes, method: str, block: bytes, has_host: bool, body: bytes, host: str
) -> bytes:
    host_line = b"" if has_host else b"host: %s\r\n" % host.encode()
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        return b"%s%s%scontent-length: %d\r\n\r\n%s" % (line, block, host_line, len(body), body)
    return b"%s%s%s\r\n" % (line, block, host_line)


def stream_lines(window: int, idle_timeout_ms: int) -> bytes:
    """The head's lines asking the callee for a rule's stream window and idle
    timeout (``H_STREAM_WINDOW``, ``H_STREAM_IDLE``; 0: not asked)."""
    out = b""
    if window:
        out += b"%s: %d\r\n" % (_STREAM_WINDOW_B, window)
    if idle_timeout_ms:
        out += b"%s: %d\r\n" % (_STREAM_IDLE_B, idle_timeout_ms)
    return out
