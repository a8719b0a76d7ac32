"""What the outbound listeners parse a request into, and what they hand it to.

:class:`Request` (and :class:`StreamedRequest`, whose body is still
arriving) is what natsmesh_sidecar.calls.outbound routes, whichever
listener parsed it: the HTTP/1.1 one (natsmesh_sidecar.edge.listener) or
the HTTP/2 one (natsmesh_sidecar.edge.h2); a request header's fate
(forwarded, kept aside, dropped) is decided here for both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from natsmesh_sidecar import codec

if TYPE_CHECKING:
    from natsmesh_sidecar.transport.stream.caller import CallerStream

logger = logging.getLogger(__name__)

#: Headers the handler needs by name; everything else is only forwarded.
_SPECIAL = frozenset(
    {
        "host",
        "x-request-id",
        "traceparent",
        "idempotency-key",
        "content-type",
        # Never forwarded: a streamed body's length travels as Nm-Length, and
        # the listener answers 100 Continue itself.
        "content-length",
        "expect",
        # Kept aside, never forwarded: which protocol an Upgrade asks for.
        "upgrade",
    }
)
_DROP = codec.HOP_BY_HOP | {"x-request-id", "traceparent"}
#: What on_header does with a header: forward it, keep it aside (the host
#: both), or drop it.
_FORWARD, _SPECIAL_ONLY, _HOST, _DROPPED = 0, 1, 2, 3
#: Header name as received -> (name, lower-case name, what to do): the same
#: few names come with every request. Bounded: names come from clients.
_NAMES: dict[bytes, tuple[str, str, int]] = {}


def _name(name: bytes) -> tuple[str, str, int]:
    n = name.decode("latin-1")
    low = n.lower()
    if low in _SPECIAL:
        kind = _HOST if low == "host" else _SPECIAL_ONLY
    elif low in _DROP or low.startswith(codec.MESH_PREFIX_LOWER):
        kind = _DROPPED
    else:
        kind = _FORWARD
    if len(_NAMES) >= 4096:
        _NAMES.clear()
    found = _NAMES[name] = (n, low, kind)
    return found


class Request:
    __slots__ = (
        "body",
        "headers",
        "host",
        "keep_alive",
        "method",
        "path",
        "special",
        "target",
        "traceparent",
    )

    def __init__(
        self,
        method: str,
        target: str,
        host: str,
        headers: list[tuple[str, str]],
        special: dict[str, str],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.path = target.split("?", 1)[0]
        self.host = host
        self.headers = headers
        self.special = special
        self.body = body
        self.keep_alive = keep_alive
        #: The traceparent sent on (the outbound span's, when tracing).
        self.traceparent: str | None = None

    def lower_headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers} | self.special


class StreamedRequest(Request):
    """A request whose body is still arriving: ``stream`` carries it (and its answer)."""

    __slots__ = ("stream",)

    stream: CallerStream  # or a WebSocket's natsmesh_sidecar.transport.stream.tunnel.CallerTunnel


#: How a handler hands a later answer to the connection.
Done = Callable[[Request, "bytes | CallerStream"], None]


class Handler(Protocol):
    """What turns a parsed request into its response (natsmesh_sidecar.calls.outbound)."""

    def start(self, req: Request, done: Done) -> bytes | None:
        """The response now, or None when ``done(req, response)`` will be called later."""
        ...

    def tunnel_refusal(self, authority: str) -> tuple[int, str, str] | None:
        """(status, code, message) refusing a CONNECT to ``authority``; None to open it."""
        ...
