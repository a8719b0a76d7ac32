"""The per-message fast paths give exactly what the straightforward code gave.

The header parser, the header encoder and the HTTP request and response
renderers run once or twice per request on each sidecar, so they were
rewritten for speed (one decode or encode per block, one regex per block, a
cache of validated header names). The straightforward versions they replaced are kept here as
the specification, and random inputs (hypothesis) must give the same output.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natsmesh_sidecar import codec
from natsmesh_sidecar.calls import inbound, route
from natsmesh_sidecar.edge import request
from natsmesh_sidecar.transport import natsfast

pytestmark = pytest.mark.unit

_CRLF = b"\r\n"
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def reference_parse_headers(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    if not raw:
        return out
    first, _, rest = raw.partition(_CRLF)
    if len(first) > 9 and first[8:9] == b" ":
        status, _, desc = first[9:].strip().partition(b" ")
        if status.isdigit():
            out["Status"] = status.decode()
            if desc:
                out["Description"] = desc.decode("utf-8", "replace")
    for line in rest.split(_CRLF):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if not key or any(c.isspace() for c in key):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def reference_encode_headers(headers: dict[str, str]) -> bytes:
    parts = [b"NATS/1.0\r\n"]
    for k, v in headers.items():
        if "\r" in v or "\n" in v:
            v = v.translate(_NEWLINES)
        parts.append(f"{k}: {v}\r\n".encode())
    parts.append(_CRLF)
    return b"".join(parts)


def reference_render_request(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes, host: str
) -> bytes | None:
    m = method.encode("latin-1", "replace")
    t = target.encode("latin-1", "replace")
    if (
        not codec.valid_method(method)
        or not t.startswith(b"/")
        or _BAD_VALUE_RE.search(t)
        or b" " in t
    ):
        return None
    parts = [b"%s %s HTTP/1.1\r\n" % (m, t)]
    has_host = False
    for name, value in headers:
        n = name.encode("latin-1", "replace")
        v = value.encode("latin-1", "replace")
        low = name.lower()
        if low in codec.HOP_BY_HOP:
            continue
        if _TOKEN_RE.fullmatch(n) is None or _BAD_VALUE_RE.search(v) is not None:
            continue
        if low == "host":
            has_host = True
        parts.append(b"%s: %s\r\n" % (n, v))
    if not has_host:
        parts.append(b"host: %s\r\n" % host.encode())
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        parts.append(b"content-length: %d\r\n" % len(body))
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


def reference_render_response(
    status: int, headers: list[tuple[str, str]], body: bytes, keep_alive: bool
) -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, codec.reason(status))]
    for name, value in headers:
        if name.lower() in codec.HOP_BY_HOP:
            continue
        n = name.encode("latin-1", "replace")
        v = value.encode("latin-1", "replace")
        if not codec.valid_header(n, v):
            continue
        parts.append(b"%s: %s\r\n" % (n, v))
    if status not in (204, 304):
        parts.append(b"content-length: %d\r\n" % len(body))
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if status not in (204, 304):
        parts.append(body)
    return b"".join(parts)


# Bytes that matter to the parsers: separators, whitespace of every kind
# (ASCII, the \x1c-\x1f separators str.isspace() knows, Unicode spaces),
# invalid and valid UTF-8, and plain letters.
_PIECES = [
    b"\r\n", b"\r", b"\n", b":", b": ", b" ", b"\t", b"\x0b", b"\x0c", b"\x1c", b"\x1f",
    b"\x00", b"\x7f", b"\xff", b"\xe2\x82", b"\xe2\x82\xac", b"\xc2\xa0", b"\xc2\x85",
    b"NATS/1.0", b"NATS/1.0 503", b" 408 Request Timeout", b"Nm-", b"X-Id", b"a", b"Z9",
]  # fmt: skip
_raw = st.lists(st.sampled_from(_PIECES), max_size=30).map(b"".join)
_text = st.text(
    alphabet=st.sampled_from(
        ["a", "B", "-", ":", " ", "\t", "\r", "\n", "\x00", "\x1c", "\x7f", "\xe9", "\u20ac", "/"]
    ),
    max_size=12,
)


@settings(max_examples=400, deadline=None)
@given(_raw)
def test_parse_headers_matches_the_reference(body: bytes) -> None:
    for raw in (body, b"NATS/1.0\r\n" + body, b"NATS/1.0 503 x\r\n" + body + b"\r\n\r\n"):
        assert natsfast.parse_headers(raw) == reference_parse_headers(raw)


def test_parse_headers_name_cache_is_bounded() -> None:
    for i in range(natsfast._KEYS_MAX + 10):
        natsfast.parse_headers(b"NATS/1.0\r\nX-%d: v\r\n\r\n" % i)
    assert len(natsfast._KEYS) <= natsfast._KEYS_MAX


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_text, _text, max_size=6))
def test_encode_headers_matches_the_reference(headers: dict[str, str]) -> None:
    assert natsfast.encode_headers(headers) == reference_encode_headers(headers)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_text, _text), max_size=6), st.sampled_from(["GET", "POST"]))
def test_render_request_matches_the_reference(headers: list[tuple[str, str]], method: str) -> None:
    for extra in ([], [("Host", "app"), ("Content-Length", "9")]):
        hdrs = headers + extra
        got = codec.render_request(method, "/p?q=1", hdrs, b"body", "h:1")
        assert got == reference_render_request(method, "/p?q=1", hdrs, b"body", "h:1")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_text, _text), max_size=6), st.sampled_from([200, 204, 503]))
def test_render_response_matches_the_reference(headers: list[tuple[str, str]], status: int) -> None:
    for extra in ([], [("Content-Type", "a/b"), ("Transfer-Encoding", "chunked")]):
        hdrs = headers + extra
        for keep_alive in (True, False):
            got = codec.render_response(status, hdrs, b"body", keep_alive=keep_alive)
            assert got == reference_render_response(status, hdrs, b"body", keep_alive)


def test_ids_from_the_random_buffer_stay_valid_and_distinct() -> None:
    """Across several refills of the buffer: the UUIDv4 and traceparent shapes hold."""
    uuid_re = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
    ids = [codec.new_request_id() for _ in range(1000)]
    assert all(uuid_re.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)
    parents = [codec.next_traceparent(None) for _ in range(300)]
    assert all(re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", p) for p in parents)
    assert len({p.split("-")[1] for p in parents}) == len(parents)


# -- header blocks without the dicts in between --------------------------------------
#
# The request and reply paths used to map headers HTTP -> dict -> NATS block ->
# dict -> HTTP; the fused functions must write exactly what those compositions of
# the general functions (still in codec, and their fallback) wrote.

_NAMES = st.sampled_from(
    ["Host", "host", "Accept", "X-A", "x-a", "Status", "description", "Nats-Foo", "a!#b"]
)
_NATS_KEYS = st.sampled_from(
    [
        "Host",
        "X-A",
        "x-a",
        "Content-Length",
        "connection",
        "Nm-Method",
        "nm-x",
        "NM-Y",
        "nM-Z",
        "Nm-Esc-Status",
        "Nm-Dup-1-X-A",
        "Nm-Dup-2-Nm-Esc-Status",
        "Nm-Dup-x",
        "Status",
        "bad name",
        "X-Request-Id",
    ]
)
_pairs = st.lists(st.tuples(_NAMES, _text), max_size=6)


@settings(max_examples=400, deadline=None)
@given(_pairs)
def test_nats_lines_match_encoding_the_mapped_dict(headers: list[tuple[str, str]]) -> None:
    block = natsfast.encode_headers(codec.http_to_nats(headers))
    assert codec.nats_lines(headers) == block[len(b"NATS/1.0\r\n") : -2].decode()


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(_NATS_KEYS, _text, max_size=8),
    st.lists(st.tuples(st.sampled_from(["X-Request-Id", "host", "TE", "Nm-Q"]), _text), max_size=2),
)
def test_http_block_matches_mapping_then_rendering(
    headers: dict[str, str], extra: list[tuple[str, str]]
) -> None:
    want = codec._header_block([*codec.nats_to_http(headers), *extra])
    assert codec.http_block(headers, extra) == want
    got = codec.render_request_from_nats("PUT", "/a?b", headers, extra, b"x", "app:1")
    assert got == codec.render_request(
        "PUT", "/a?b", [*codec.nats_to_http(headers), *extra], b"x", "app:1"
    )
    for status, head in ((200, False), (204, False), (404, True)):
        for keep_alive in (True, False):
            block = codec.http_block(headers)[0]
            got = codec.render_block_response(status, block, b"body", keep_alive, head)
            assert got == codec.render_response(
                status, codec.nats_to_http(headers), b"body", keep_alive=keep_alive, head=head
            )


@settings(max_examples=300, deadline=None)
@given(_pairs, st.integers(100, 599), st.sampled_from(["", "app_timeout", "a\r\nb"]))
def test_reply_head_matches_encoding_the_reply_dict(
    headers: list[tuple[str, str]], status: int, error: str
) -> None:
    rh = codec.http_to_nats(headers)
    rh[codec.H_STATUS] = str(status)
    if error:
        rh[codec.H_ERROR] = error
    got = inbound.reply_head(codec.nats_lines(headers), status, error)
    assert got == natsfast.encode_headers(rh)


@settings(max_examples=300, deadline=None)
@given(
    _pairs,
    st.sampled_from(["GET", "POST"]),
    _text,
    st.dictionaries(st.sampled_from(["content-type", "idempotency-key", "traceparent"]), _text),
    st.integers(-5, 30_000),
)
def test_request_head_matches_encoding_the_request_dict(
    headers: list[tuple[str, str]], method: str, rid: str, special: dict[str, str], ms: int
) -> None:
    """What outbound sent before: the dict of the app's and the mesh's headers, encoded."""
    req = request.Request(method, "/p?q", "app", headers, special, b"", True)
    got = b"%sNm-Timeout-Ms: %d\r\n\r\n" % (route.request_head(req, rid, "gw.shop", None), ms)
    hdrs = codec.http_to_nats(headers)
    hdrs[codec.H_METHOD] = method
    hdrs[codec.H_TARGET] = "/p?q"
    hdrs[codec.H_SOURCE] = "gw.shop"
    hdrs[codec.REQUEST_ID] = rid
    # A random span id (the trace's is kept: see the test below): from the output.
    hdrs[codec.TRACEPARENT] = natsfast.parse_headers(got)[codec.TRACEPARENT]
    for name in ("content-type", "idempotency-key"):
        if name in special:
            hdrs[name] = special[name]
    hdrs[codec.H_TIMEOUT] = str(ms)
    assert got == natsfast.encode_headers(hdrs)


def test_request_head_continues_the_callers_trace() -> None:
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    req = request.Request("GET", "/", "app", [], {"traceparent": incoming}, b"", True)
    tp = natsfast.parse_headers(route.request_head(req, "r", "gw.shop", None) + b"\r\n")[
        codec.TRACEPARENT
    ]
    assert tp.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert tp.endswith("-01")
    assert tp != incoming
