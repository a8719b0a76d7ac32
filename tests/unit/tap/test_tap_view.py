"""``natsmesh tap``'s output without a cluster: lines, JSON, drops, what it refuses."""

from __future__ import annotations

import json

import pytest

from natsmesh_operator.usercli import tapview
from natsmesh_operator.usercli.tap import control
from natsmesh_sidecar.observe import tap

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
        b'{"kind": "status", "instance": "\\u001b]0;pwned\\u0007"}',
        sidecar_record(direction="sideways"),
        # what no sidecar of ours sends: a forged one is refused, not shown
        json.dumps({**json.loads(sidecar_record()), "method": "X" * 100}).encode(),
        # a forged time that would end the CLI in datetime (OverflowError, ValueError)
        json.dumps({**json.loads(sidecar_record()), "ts": 1e20}).encode(),
        sidecar_record().replace(b'"ts": 1700000000.25', b'"ts": NaN'),
        sidecar_record().replace(b'"latencyMs": 0.4', b'"latencyMs": Infinity'),
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


def test_a_callers_long_path_method_or_request_id_is_clipped_not_hidden() -> None:
    # All three come from the caller (Nm-Target, Nm-Method, the request id
    # header): a record the CLI refused would hide that request from the tap.
    parsed = tapview.parse(
        sidecar_record(path="/a" * 5000 + "?q=1", method="M" * 100, request_id="r" * 1000)
    )
    assert isinstance(parsed, tapview.TapRecord)
    assert parsed.path.startswith("/a/a")
    assert len(parsed.path) <= 4096
    assert parsed.method == "M" * 32
    assert parsed.request_id == "r" * 256


def test_control_characters_from_callers_do_not_reach_the_terminal() -> None:
    # A caller's Nm-Target is refused by the callee (400) but still recorded:
    # its escape sequences would otherwise be written to the operator's terminal.
    parsed = tapview.parse(
        sidecar_record(path="/x\x1b]0;pwned\x07\x1b[2J\r\n", method="G\x1bT", error="e\x9b")
    )
    assert isinstance(parsed, tapview.TapRecord)
    text = tapview.line(parsed)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text), repr(text)
    assert "/x\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x0a" in text
    assert "G\\x1bT" in text
    assert "error=e\\x9b" in text
    # A bidi override would reorder what the line shows.
    flipped = tapview.parse(sidecar_record(path="/admin\u202etxt.gp"))
    assert isinstance(flipped, tapview.TapRecord)
    assert "/admin\\u202etxt.gp" in tapview.line(flipped)
    # Printable text other than ASCII is kept as it is.
    plain = tapview.parse(sidecar_record(path="/caf\u00e9"))
    assert isinstance(plain, tapview.TapRecord)
    assert " GET /caf\u00e9  " in tapview.line(plain)
