"""The hot NATS path: header encoding/parsing and the nats-py internals it relies on."""

from __future__ import annotations

import inspect

import pytest
from nats.aio.client import Client
from nats.protocol import parser

from natsmesh_sidecar import natsfast

pytestmark = pytest.mark.unit


def test_nats_py_internals_still_exist() -> None:
    """natsfast hooks these private parts of nats-py (pinned); fail loudly if they move."""
    nc = Client()
    for attr in ("_pending", "_pending_data_size", "_flush_queue", "_max_pending_size", "stats"):
        assert hasattr(nc, attr), attr
    sig = inspect.signature(Client._process_msg)
    assert list(sig.parameters) == ["self", "sid", "subject", "reply", "data", "headers"]
    assert "self.nc._process_msg(" in inspect.getsource(parser.Parser.parse)
    assert "self._flush_queue.get()" in inspect.getsource(Client._flusher)


def test_headers_round_trip_like_nats_py() -> None:
    hdrs = {
        "Nm-Method": "PUT",
        "Nm-Target": "/a?b=c d",
        "X-Custom": "a b  c",
        "X-Latin": "\xe9\xff",  # HTTP bytes decoded as latin-1 survive as text
        "Nm-Dup-1-Accept": "c/d",
    }
    raw = natsfast.encode_headers(hdrs)
    assert raw.startswith(b"NATS/1.0\r\n")
    assert raw.endswith(b"\r\n\r\n")
    assert natsfast.parse_headers(raw) == hdrs
    assert Client._parse_header_lines(raw[len(b"NATS/1.0\r\n") :]) == hdrs


def test_newlines_in_values_cannot_inject_headers() -> None:
    raw = natsfast.encode_headers({"X-A": "1\r\nNm-Status: 200", "X-B": "2\n3"})
    assert natsfast.parse_headers(raw) == {"X-A": "1  Nm-Status: 200", "X-B": "2 3"}


def test_status_line_and_garbage() -> None:
    assert natsfast.parse_headers(b"NATS/1.0 503\r\n\r\n") == {"Status": "503"}
    assert natsfast.parse_headers(b"NATS/1.0 408 Request Timeout\r\nA: b\r\n\r\n") == {
        "Status": "408",
        "Description": "Request Timeout",
        "A": "b",
    }
    assert natsfast.parse_headers(b"") == {}
    # Lines without a colon, non-ASCII names and names with spaces are skipped.
    got = natsfast.parse_headers(
        b"NATS/1.0\r\nnocolon\r\n\xff\xfe: x\r\nA B: y\r\nOk: \xff\r\n\r\n"
    )
    assert got == {"Ok": "\ufffd"}


def test_violation_subject() -> None:
    text = 'nats: Permissions Violation for Publish to "mesh.shop.payments.v1"'
    assert natsfast.violation_subject(text) == ("publish", "mesh.shop.payments.v1")
    sub = 'nats: permissions violation for subscription to "_INBOX.x.>"'
    assert natsfast.violation_subject(sub) == ("subscription", "_INBOX.x.>")
    assert natsfast.violation_subject("nats: Maximum Payload Violation") is None
    assert natsfast.violation_subject("Permissions Violation for Publish to nothing") is None
