"""HTTP <-> NATS header mapping, traceparent, permissions and host resolution."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from natsmesh_sidecar import codec
from natsmesh_sidecar.config import MeshTable
from natsmesh_sidecar.policy import permissions
from natsmesh_sidecar.policy.table import FORBIDDEN, FOUND, UNKNOWN, Router
from natsmesh_sidecar.wire import coerce_table
from tests.integration.sidecar.sidecar_harness import destination, table

pytestmark = pytest.mark.unit


def test_headers_round_trip_with_repeats_and_reserved_names() -> None:
    http = [
        ("Accept", "a"),
        ("Accept", "b"),
        ("Accept", "c"),
        ("Status", "x"),
        ("Nats-Msg-Id", "y"),
        ("X-Ä", "\xe9"),
    ]
    nats_hdrs = codec.http_to_nats(http)
    assert "Status" not in nats_hdrs
    assert not any(k.startswith("Nats-") for k in nats_hdrs)
    assert codec.nats_to_http(nats_hdrs) == http


def test_mesh_headers_are_not_app_headers() -> None:
    assert codec.nats_to_http({codec.H_STATUS: "200", codec.H_SOURCE: "a.b", "X": "1"}) == [
        ("X", "1")
    ]


def test_traceparent_keeps_trace_and_new_span() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    nxt = codec.next_traceparent(tp)
    assert nxt.startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert nxt.split("-")[2] != "b7ad6b7169203331"
    assert nxt.endswith("-01")
    for bad in (
        None,
        "",
        "garbage",
        "00-" + "0" * 32 + "-b7ad6b7169203331-01",
        "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",
    ):
        fresh = codec.next_traceparent(bad)
        assert len(fresh) == 55
        assert fresh.split("-")[1] != "0" * 32


def test_render_request_refuses_injection() -> None:
    assert codec.render_request("GET", "/x\r\nEvil: 1", [], b"", "h") is None
    assert codec.render_request("G ET", "/x", [], b"", "h") is None
    assert codec.render_request("GET", "http://x/", [], b"", "h") is None
    out = codec.render_request(
        "POST", "/x", [("Bad Name", "v"), ("Ok", "v\x00"), ("Good", "v")], b"hi", "h"
    )
    assert out is not None
    assert b"Bad Name" not in out
    assert b"Ok:" not in out
    assert b"Good: v" in out
    assert out.endswith(b"content-length: 2\r\n\r\nhi")


def test_render_response_drops_hop_by_hop() -> None:
    out = codec.render_response(
        200, [("Transfer-Encoding", "chunked"), ("X", "1")], b"abc", keep_alive=False
    )
    assert out == b"HTTP/1.1 200 OK\r\nX: 1\r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc"


def _jwt(claims: dict[str, object]) -> str:
    def enc(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{enc({'typ': 'JWT', 'alg': 'ed25519-nkey'})}.{enc(claims)}.sig"


def test_permissions_from_creds(tmp_path: Path) -> None:
    jwt = _jwt(
        {
            "nats": {
                "pub": {
                    "allow": ["mesh.shop.orders.*", "events.shop.web.>"],
                    "deny": ["mesh.shop.orders.v9"],
                }
            }
        }
    )
    creds = tmp_path / "u.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\nSUAXXX\n------END USER NKEY SEED------\n"
    )
    p = permissions.from_creds_file(str(creds))
    assert p.can_publish("mesh.shop.orders.v1")
    assert not p.can_publish("mesh.shop.orders.v9")
    assert not p.can_publish("mesh.shop.billing.v1")
    assert p.can_publish("events.shop.web.created")
    assert permissions.from_claims({"nats": {}}).can_publish("anything")
    with pytest.raises(ValueError, match="JWT"):
        permissions.jwt_from_creds("nothing here")


def test_router_resolves_host_forms() -> None:
    t: MeshTable = table(
        "shop",
        "web",
        destinations=[destination("shop", "orders"), destination("ops", "audit")],
        known=("billing.shop",),
    )
    r = Router(coerce_table(t))
    assert r.resolve("orders")[:2] == (FOUND, "orders.shop")
    assert r.resolve("orders.shop:8080")[:2] == (FOUND, "orders.shop")
    assert r.resolve("audit.ops.svc.cluster.local")[:2] == (FOUND, "audit.ops")
    assert r.resolve("Orders")[:2] == (FOUND, "orders.shop")
    assert r.resolve("billing")[:2] == (FORBIDDEN, "billing.shop")
    assert r.resolve("nosuch")[0] == UNKNOWN


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("200", 200),
        ("599", 599),
        (404, 404),
        ("100", None),
        ("199", None),
        ("600", None),
        ("999", None),
        ("2000", None),
        ("+20", None),
        (" 20", None),
        ("\uff12\uff10\uff10", None),
        ("", None),
        (None, None),
        (101, None),
        (True, None),
    ],
)
def test_final_status(value: object, expected: int | None) -> None:
    assert codec.final_status(value) == expected


def test_render_response_refuses_interim_status_and_split_headers() -> None:
    with pytest.raises(ValueError, match="status 100"):
        codec.render_response(100, [], b"HTTP/1.1 200 OK\r\n\r\n", keep_alive=True)
    out = codec.render_response(
        200,
        [("X-A", "1\r\nx-b: 2"), ("X-C", "a\nb"), ("X-D", "a\x00"), ("Bad Name", "v"), ("Ok", "v")],
        b"hi",
        keep_alive=True,
    )
    assert out == b"HTTP/1.1 200 OK\r\nOk: v\r\ncontent-length: 2\r\n\r\nhi"
