"""The stream wire format and its two ends, as pure logic (no sockets, no NATS)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natsmesh_sidecar import codec, subjects
from natsmesh_sidecar.transport.natsfast import parse_headers
from natsmesh_sidecar.transport.stream import protocol
from natsmesh_sidecar.transport.stream.protocol import StreamError
from natsmesh_sidecar.transport.stream.receiver import Receiver
from natsmesh_sidecar.transport.stream.sender import Sender
from natsmesh_sidecar.wire import StreamLimits

pytestmark = pytest.mark.unit

CALL = "0123456789abcdef01234567"


def test_call_subject_is_the_request_subject_marked_with_the_call_in_the_version_slot() -> None:
    assert (
        protocol.call_subject("mesh.shop.orders.v1.shop.web", CALL)
        == f"mesh._shop.orders.{CALL}.shop.web"
    )
    # What the operator grants the callee covers it; the caller's one
    # request permission (its identity last) covers it too.
    granted = subjects.stream_serve_subject("shop", "orders", "shop", "*")
    subject = protocol.call_subject("mesh.shop.orders.v1.shop.web", CALL)
    assert subject is not None
    assert subjects.subject_matches(granted, subject)
    assert subjects.subject_matches(subjects.caller_publish("shop", "web"), subject)
    assert not subjects.subject_matches(subjects.caller_publish("shop", "evil"), subject)
    # ...and never a service subject: the callee's grant cannot hear requests.
    assert not subjects.subject_matches(granted, "mesh.shop.orders.v1.shop.web")


@pytest.mark.parametrize(
    ("subject", "call"),
    [
        ("mesh.shop.orders.v1.shop", CALL),  # not a request subject
        ("events.shop.orders.v1.shop.web", CALL),
        ("mesh._shop.orders.v1.shop.web", CALL),  # already a call subject
        ("mesh.shop.orders.v1.shop.web", "*"),  # a wildcard as the call
        ("mesh.shop.orders.v1.shop.web", ">"),
        ("mesh.shop.orders.v1.shop.web", "a.b"),
        ("mesh.shop.orders.v1.shop.web", CALL.upper()),
        ("mesh.shop.orders.v1.shop.web", CALL[:-1]),
    ],
)
def test_call_subject_refuses_anything_but_a_request_subject_and_a_call_id(
    subject: str, call: str
) -> None:
    assert protocol.call_subject(subject, call) is None


def test_new_call_ids_are_valid_and_distinct() -> None:
    ids = {protocol.new_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(protocol.valid_call_id(i) for i in ids)


def test_crossing_namespaces() -> None:
    assert not protocol.crosses("mesh.shop.orders.v1.shop.web")
    assert protocol.crosses("mesh.shop.orders.v1.other.web")
    # A reply through a service import is the server's _R_ subject, never an inbox.
    assert protocol.answers_once("_R_.abc.def")
    assert not protocol.answers_once("_INBOX.mesh.web.x.s1")


def test_a_callee_across_namespaces_beats_within_the_reply_threshold() -> None:
    """nats-server drops a Stream reply mapping quiet for 2 minutes: a callee
    across namespaces beats every 30 s at most, whatever the idle timeout."""
    hour = StreamLimits(chunk_bytes=1024, window=8, idle_timeout_s=3600.0)
    assert protocol.beat_period(hour, crossing=False) == 900.0
    assert protocol.beat_period(hour, crossing=True) == protocol.CROSS_BEAT_S == 30.0
    short = StreamLimits(chunk_bytes=1024, window=8, idle_timeout_s=2.0)
    assert protocol.beat_period(short, crossing=True) == 0.5


def test_kind_of_each_message() -> None:
    assert protocol.kind(parse_headers(protocol.chunk_block(3, False)), b"x") == protocol.CHUNK
    assert protocol.kind(parse_headers(protocol.credit_block(8)), b"") == protocol.CREDIT
    assert protocol.kind(parse_headers(protocol.abort_block("gone")), b"") == protocol.ABORT
    assert protocol.kind(parse_headers(protocol.BEAT_BLOCK), b"") == protocol.BEAT
    assert protocol.kind({protocol.H_STREAM_STATUS: "200"}, b"") == protocol.HEAD
    assert protocol.kind({codec.H_STATUS: "413"}, b"{}") == protocol.FINAL
    # What closes a reply mapping across namespaces: nothing at all.
    assert protocol.kind({}, b"") == protocol.END
    assert protocol.kind({}, b"x") == protocol.INVALID
    assert protocol.kind({"Status": "503"}, b"") == protocol.NO_RESPONDERS
    # the header codec's constant is the protocol's
    assert codec.H_STREAM == protocol.H_STREAM


def test_abort_reason_cannot_break_the_header_block() -> None:
    block = protocol.abort_block("bad\r\nNm-Seq: 1\r\n")
    assert parse_headers(block) == {protocol.H_ABORT: "bad  Nm-Seq: 1"}


def test_check_chunk_refuses_gaps_and_garbage() -> None:
    assert protocol.check_chunk(0, {protocol.H_SEQ: "0"}) is False
    assert protocol.check_chunk(4, {protocol.H_SEQ: "4", protocol.H_EOF: "1"}) is True
    for bad in ("5", "3", "-1", "x", "", "9" * 30):
        with pytest.raises(StreamError):
            protocol.check_chunk(4, {protocol.H_SEQ: bad})


def test_grant_waits_for_half_a_window() -> None:
    assert protocol.grant(consumed=0, granted=8, window=8) is None
    assert protocol.grant(consumed=3, granted=8, window=8) is None
    assert protocol.grant(consumed=4, granted=8, window=8) == 12
    assert protocol.grant(consumed=1, granted=1, window=1) == 2


def test_http_chunk_framing() -> None:
    assert protocol.http_chunk(b"hello") == b"5\r\nhello\r\n"
    assert protocol.http_chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"


class Wire:
    """A sender and a receiver joined by a list of messages in flight."""

    def __init__(self, chunk: int, window: int, length: int | None = None) -> None:
        self.flight: list[tuple[bytes, bytes]] = []
        self.out: list[bytes] = []
        self.credits: list[int] = []
        self.paused = False
        self.finished = False
        self.sender = Sender(chunk, pause=self._pause, resume=self._resume)
        self.receiver = Receiver(
            window,
            deliver=self.out.append,
            finish=self._finish,
            send_credit=self.credits.append,
            length=length,
        )

    def _pause(self) -> None:
        self.paused = True

    def _resume(self) -> None:
        self.paused = False

    def _finish(self) -> None:
        self.finished = True

    def open(self) -> None:
        def publish(block: bytes, payload: bytes) -> bool:
            self.flight.append((block, payload))
            return True

        self.sender.bind(publish, self.receiver.open())

    def deliver_all(self) -> None:
        """Deliver what is in flight, then the credits sent back meanwhile."""
        while self.flight or self.credits:
            flight, self.flight = self.flight, []
            for block, payload in flight:
                self.receiver.on_chunk(parse_headers(block), payload)
            credits = list(self.credits)
            self.credits.clear()  # the receiver holds this list's append
            for c in credits:
                self.sender.on_credit(c)


@settings(max_examples=60, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=0, max_size=3000), max_size=40),
    chunk=st.integers(16, 1024),
    window=st.integers(1, 6),
)
def test_any_body_arrives_whole_in_order_within_the_window(
    pieces: list[bytes], chunk: int, window: int
) -> None:
    body = b"".join(pieces)
    w = Wire(chunk, window, length=len(body))
    w.open()
    for piece in pieces:
        w.sender.feed(piece)
        # never more chunks in flight than the window
        assert w.sender.next_seq <= w.receiver.granted
        assert all(len(p) <= chunk for _, p in w.flight)
        w.deliver_all()
    w.sender.end()
    w.deliver_all()
    assert b"".join(w.out) == body
    assert w.finished
    assert w.sender.eof_sent


def test_a_receiver_that_stops_granting_stops_the_sender_and_pauses_its_source() -> None:
    w = Wire(chunk=100, window=2)
    w.open()
    w.receiver.set_blocked(True)  # the sink is full: no more credit
    fed = 0
    for _ in range(10):
        if not w.paused:  # a paused socket is not read
            w.sender.feed(b"x" * 100)
            fed += 100
        w.deliver_all()
    assert w.sender.next_seq == 2  # the first window only
    assert w.paused  # and the source stopped being read
    # held: above the high mark (two chunks) by at most the read that crossed it
    assert w.sender.buffered <= 3 * 100
    assert fed < 1000
    w.receiver.set_blocked(False)
    w.deliver_all()
    assert not w.paused
    assert sum(map(len, w.out)) == fed - w.sender.buffered


def test_a_gap_or_a_short_body_is_an_error_never_a_complete_body() -> None:
    w = Wire(chunk=10, window=8, length=30)
    w.open()
    w.sender.feed(b"a" * 30)
    blocks = list(w.flight)
    w.flight.clear()
    w.receiver.on_chunk(parse_headers(blocks[0][0]), blocks[0][1])
    with pytest.raises(StreamError, match="gap"):
        w.receiver.on_chunk(parse_headers(blocks[2][0]), blocks[2][1])
    short = Wire(chunk=10, window=8, length=30)
    short.open()
    short.sender.feed(b"a" * 20)
    short.sender.end()
    with pytest.raises(StreamError, match="announced"):
        short.deliver_all()
    assert not short.finished


def test_small_pieces_are_sent_at_once_not_held_for_a_full_chunk() -> None:
    """A Server-Sent Event must not wait for 128 KiB of company."""
    w = Wire(chunk=128 * 1024, window=4)
    w.open()
    w.sender.feed(b"data: 1\n\n")
    assert [p for _, p in w.flight] == [b"data: 1\n\n"]


# -- a route rule's stream settings on the head ------------------------------------------

BASE = StreamLimits(chunk_bytes=64 * 1024, window=8, idle_timeout_s=60.0)


def test_a_head_without_stream_settings_keeps_the_sidecars_limits() -> None:
    assert protocol.limits_of({"Nm-Stream": CALL}, BASE) is BASE
    assert codec.stream_lines(0, 0) == b""


def test_the_rules_window_and_idle_timeout_travel_on_the_head() -> None:
    head = b"NATS/1.0\r\n" + codec.stream_lines(16, 2500) + b"\r\n"
    limits = protocol.limits_of(parse_headers(head), BASE)
    assert limits == StreamLimits(chunk_bytes=64 * 1024, window=16, idle_timeout_s=2.5)
    # One of the two: the other stays the sidecar's.
    only_idle = parse_headers(b"NATS/1.0\r\n" + codec.stream_lines(0, 1000) + b"\r\n")
    assert protocol.limits_of(only_idle, BASE) == StreamLimits(64 * 1024, 8, 1.0)
    only_window = parse_headers(b"NATS/1.0\r\n" + codec.stream_lines(2, 0) + b"\r\n")
    assert protocol.limits_of(only_window, BASE) == StreamLimits(64 * 1024, 2, 60.0)


@pytest.mark.parametrize(
    ("window", "idle", "expected"),
    [
        ("1000", "1", (protocol.MAX_WINDOW, 1.0)),  # clamped to the API's bounds
        ("0", "99999999999", (1, 3600.0)),
        ("-3", "abc", (8, 60.0)),  # not numbers: the sidecar's
        ("", "", (8, 60.0)),
    ],
)
def test_what_a_head_asks_for_is_clamped(
    window: str, idle: str, expected: tuple[int, float]
) -> None:
    limits = protocol.limits_of({protocol.H_WINDOW: window, protocol.H_IDLE: idle}, BASE)
    assert (limits.window, limits.idle_timeout_s) == expected


def test_the_api_and_the_callee_bound_a_rule_alike() -> None:
    from natsmesh_operator.api import route
    from natsmesh_operator.api.common import parse_duration_ms

    assert route.MAX_STREAM_WINDOW == protocol.MAX_WINDOW
    bounds = route.STREAM_IDLE_RANGE
    assert (
        parse_duration_ms(bounds.low),
        parse_duration_ms(bounds.high),
    ) == protocol.IDLE_MS_BOUNDS
