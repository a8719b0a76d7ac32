"""``natsmesh tap``'s output without a cluster: lines, JSON, drops, what it refuses."""

from __future__ import annotations

import json

import pytest

from natsmesh_operator.usercli import tapview
from natsmesh_operator.usercli.tap import control
from natsmesh_sidecar import tap

pytestmark = pytest.mark.unit


def sidecar_record(**extra: object) -> bytes:
    fields: dict[str, object] = {
        "instance": "0123456789abcdef",
        "direction": "outbound",
        "method": "GET",
        "path": "/items/7?x=1",
        "status": 503,
        "duration_s": 0.0004,
        "source": "gateway.shop",
        "destination": "orders.shop",
        "request_id": "r-42",
        "route": "canary",
        "error": "overloaded",
        "ts": 1_700_000_000.25,
    }
    return json.dumps(tap.record(**{**fields, **extra})).encode()  # type: ignore[arg-type]


def test_a_sidecar_record_becomes_one_readable_line() -> None:
    parsed = tapview.parse(sidecar_record())
    assert isinstance(parsed, tapview.TapRecord)
    assert tapview.line(parsed) == (
        "22:13:20.250  out  GET /items/7  503  400us  gateway.shop -> orders.shop  "
        "rid=r-42  sidecar=01234567  error=overloaded"
    )
    inbound = tapview.parse(sidecar_record(direction="inbound", duration_s=2.5, error=""))
    assert isinstance(inbound, tapview.TapRecord)
    assert "  in   GET /items/7  503  2.50s  " in tapview.line(inbound)
    assert "error=" not in tapview.line(inbound)


def test_json_output_keeps_the_sidecars_field_names() -> None:
    parsed = tapview.parse(sidecar_record(duration_s=0.0123))
    assert isinstance(parsed, tapview.TapRecord)
    assert parsed.to_json() == {
        "kind": "request",
        "ts": 1_700_000_000.25,
        "instance": "0123456789abcdef",
        "direction": "outbound",
        "method": "GET",
        "path": "/items/7",
        "status": 503,
        "latencyMs": 12.3,
        "source": "gateway.shop",
        "destination": "orders.shop",
        "requestId": "r-42",
        "route": "canary",
        "error": "overloaded",
    }


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage",
        b"[1]",
        b'{"kind": "request"}',
        b'{"kind": "status"}',
        sidecar_record(direction="sideways"),
        sidecar_record(method="X" * 100),
    ],
)
def test_what_is_not_a_record_is_skipped(raw: bytes) -> None:
    assert tapview.parse(raw) is None


def test_drops_are_counted_per_sidecar_from_this_session_on() -> None:
    seen = tapview.Sidecars()

    def status(instance: str, dropped: int) -> int:
        item = tapview.parse(
            json.dumps({"kind": "status", "instance": instance, "dropped": dropped}).encode()
        )
        assert isinstance(item, tapview.TapStatus)
        return seen.status(item)

    assert status("a", 40) == 0  # dropped for an earlier session: not ours
    assert status("b", 0) == 0
    assert status("a", 55) == 15
    assert status("a", 55) == 0
    assert status("b", 7) == 7
    assert seen.count == 2
    assert seen.total_dropped == 22
    assert tapview.summary(3, seen, "orders.shop") == (
        "3 request(s) shown from 2 sidecar(s) of orders.shop; "
        "22 dropped by the sidecars' rate limit"
    )


def test_the_cli_control_message_is_what_the_sidecar_accepts() -> None:
    assert tap.parse_control(control("0a1b2c3d4e5f6071", 10)) == ("0a1b2c3d4e5f6071", 10.0)
    assert tap.parse_control(control("0a1b2c3d4e5f6071", 0)) == ("0a1b2c3d4e5f6071", 0.0)
