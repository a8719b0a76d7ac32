"""gRPC's wire rules as the sidecar applies them: deadlines, statuses, trailers."""

from __future__ import annotations

import pytest

from natsmesh_sidecar.edge import grpcwire

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1H", 3600.0),
        ("2M", 120.0),
        ("5S", 5.0),
        ("300m", 0.3),
        ("1500u", 0.0015),
        ("99999999n", 0.099999999),
        ("0S", 0.0),
    ],
)
def test_grpc_timeout_units(value: str, seconds: float) -> None:
    assert grpcwire.timeout_seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [None, "", "S", "5", "5s", "5x", "123456789S", "-1S", " 1S", "1.5S", "٣S"],
)
def test_malformed_grpc_timeouts_mean_no_deadline(value: str | None) -> None:
    assert grpcwire.timeout_seconds(value) is None


@pytest.mark.parametrize(
    ("status", "code", "grpc_status"),
    [
        (403, "forbidden", grpcwire.PERMISSION_DENIED),
        (403, "permission_violation", grpcwire.PERMISSION_DENIED),
        (404, "unknown_service", grpcwire.UNIMPLEMENTED),
        (404, "no_route", grpcwire.UNIMPLEMENTED),
        (503, "no_responders", grpcwire.UNAVAILABLE),
        (503, "circuit_open", grpcwire.UNAVAILABLE),
        (503, "nats_unavailable", grpcwire.UNAVAILABLE),
        (503, "overloaded", grpcwire.UNAVAILABLE),
        (502, "app_unreachable", grpcwire.UNAVAILABLE),
        (502, "stream_failed", grpcwire.UNAVAILABLE),
        (504, "timeout", grpcwire.DEADLINE_EXCEEDED),
        (504, "app_timeout", grpcwire.DEADLINE_EXCEEDED),
        (413, "payload_too_large", grpcwire.RESOURCE_EXHAUSTED),
        (499, "client_closed", grpcwire.CANCELLED),
        (500, "internal", grpcwire.INTERNAL),
        (400, "bad_request", grpcwire.INTERNAL),
        (401, "", grpcwire.UNAUTHENTICATED),
        (418, "", grpcwire.UNKNOWN),
        (200, "", grpcwire.UNKNOWN),
    ],
)
def test_mesh_refusals_map_to_grpc_statuses(status: int, code: str, grpc_status: int) -> None:
    assert grpcwire.status_of(status, code) == grpc_status


def test_trailers_survive_a_nats_header_value() -> None:
    trailers = [
        ("grpc-status", "3"),
        ("grpc-message", "bad%20request%20%E2%9C%93"),
        ("x-trail-bin", "AAH/"),
        ("x-odd", "a=b&c d+e,f:g\t"),
        ("X-Upper", ""),
    ]
    value = grpcwire.encode_trailers(trailers)
    assert "\r" not in value
    assert "\n" not in value
    assert grpcwire.decode_trailers(value) == [(n.lower(), v) for n, v in trailers]


def test_grpc_message_is_percent_encoded() -> None:
    assert grpcwire.message("no service x.shop in the mesh") == "no service x.shop in the mesh"
    assert grpcwire.message("100% ✓\n") == "100%25 %E2%9C%93%0A"


@pytest.mark.parametrize(
    ("content_type", "grpc"),
    [
        ("application/grpc", True),
        ("application/grpc+proto", True),
        ("Application/GRPC+json", True),
        ("application/json", False),
        (None, False),
    ],
)
def test_what_is_a_grpc_call(content_type: str | None, grpc: bool) -> None:
    assert grpcwire.is_grpc(content_type) is grpc


@pytest.mark.parametrize("cut", [1, 9, 17, 18, 20, 24])
def test_the_http2_preface_may_come_in_pieces(cut: int) -> None:
    """The listener's parser stops after ``PRI * HTTP/2.0\\r\\n\\r\\n`` in
    whichever read ends it: what HTTP/2 gets is the whole stream again."""
    from natsmesh_sidecar.edge import h2

    stream = h2.PREFACE + b"\x00\x00\x12\x04frames"
    first, second = stream[:cut], stream[cut:]
    # The read in which the parser stopped: the first if it held all 18 bytes.
    stopped_in = first if cut >= 18 else second
    assert h2.PREFACE[:18] + h2.after_preface_line(stopped_in) == stream[:18] + (
        stream[18:] if cut < 18 else first[18:]
    )


@pytest.mark.parametrize(
    ("value", "code"),
    [("0", 0), ("14", 14), ("16", 16), ("17", 2), ("-1", 2), ("014", 2), ("x", 2), (None, 2)],
)
def test_a_status_value_is_one_of_gRPCs_codes_or_unknown(value: str | None, code: int) -> None:
    """A metric label made of it has at most 17 values, whatever an app sends."""
    assert grpcwire.status_value(value) == code


def test_status_in_headers() -> None:
    assert grpcwire.status_in([("x-a", "1"), ("grpc-status", "14")]) == 14
    assert grpcwire.status_in([("grpc-message", "x")]) is None
