"""The access log line: JSON, with ``grpcStatus`` on gRPC calls only."""

from __future__ import annotations

import json

import pytest

from natsmesh_sidecar.observe import accesslog

pytestmark = pytest.mark.unit

FIELDS = {
    "request_id": "r1",
    "direction": "outbound",
    "source": "web.shop",
    "destination": "orders.shop",
    "route": "rest",
    "method": "POST",
    "path": "/test.Echo/Echo",
    "status": 200,
    "duration_s": 0.0015,
}


def test_a_grpc_call_line_carries_its_status_as_a_number() -> None:
    line = json.loads(accesslog.line(**FIELDS, grpc_status="14"))  # type: ignore[arg-type]
    assert line["grpcStatus"] == 14
    assert line["status"] == 200
    assert line["durationMs"] == 1.5


def test_an_http_line_has_no_grpc_status() -> None:
    line = json.loads(accesslog.line(**FIELDS))  # type: ignore[arg-type]
    assert "grpcStatus" not in line
    assert line["error"] == ""
