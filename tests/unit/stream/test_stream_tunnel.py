"""Which upgrade requests the outbound listener tunnels: WebSocket only."""

from __future__ import annotations

import pytest

from natsmesh_sidecar.transport.stream.tunnel import refusal

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("upgrade", ["websocket", "WebSocket", " websocket ", "foo, websocket"])
def test_a_websocket_get_is_tunnelled(upgrade: str) -> None:
    assert refusal(b"GET", upgrade) is None


@pytest.mark.parametrize(
    ("method", "upgrade", "why"),
    [
        (b"CONNECT", "websocket", "a WebSocket upgrade must be a GET"),
        (b"GET", "h2c", "upgrade to 'h2c' is not supported"),
        (b"GET", "", "upgrade to '' is not supported"),
        (b"GET", "websockets", "upgrade to 'websockets' is not supported"),
        (b"POST", "websocket", "a WebSocket upgrade must be a GET"),
    ],
)
def test_anything_else_is_refused_with_a_reason(method: bytes, upgrade: str, why: str) -> None:
    reason = refusal(method, upgrade)
    assert reason is not None
    assert reason.startswith(why)


def test_a_long_protocol_name_is_cut_in_the_reason() -> None:
    reason = refusal(b"GET", "x" * 5000)
    assert reason is not None
    assert len(reason) < 120
