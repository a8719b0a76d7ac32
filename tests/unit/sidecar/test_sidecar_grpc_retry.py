"""A gRPC call's retry, the pure parts: what a caller's stream holds for a
replay, and which outcome of a try would be retried with which gRPC status
(natsmesh_sidecar.calls.outbound; the integration tier runs it for real in
tests/integration/grpc/test_grpc_calls.py)."""

from __future__ import annotations

import pytest

from natsmesh_sidecar import codec
from natsmesh_sidecar.calls import outbound
from natsmesh_sidecar.policy import resilience
from natsmesh_sidecar.transport.natsfast import Reply
from natsmesh_sidecar.transport.stream.caller import CallerStream
from natsmesh_sidecar.wire import StreamLimits

pytestmark = pytest.mark.unit

LIMITS = StreamLimits(chunk_bytes=1024, window=4)


class _Socket:
    """What an upload pauses: the client's reading."""

    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def upload(*chunks: bytes) -> CallerStream:
    s = CallerStream.for_upload(LIMITS, _Socket(), keep_alive=True, length=None)  # type: ignore[arg-type]
    for chunk in chunks:
        s.feed(chunk)
    return s


def test_what_came_before_the_hold_is_held_too_and_replayed_whole() -> None:
    s = upload(b"ab", b"cd")
    s.hold(1024)
    s.feed(b"ef")
    s.end_body()
    assert s.replayable()
    fresh = s.replay()
    assert s.finished  # the old try is stopped
    assert fresh is not s
    assert fresh.upload is not None
    assert b"".join(fresh.upload.buf) == b"abcdef"
    assert fresh.body_complete
    assert fresh.upload.ended
    # The fresh try holds it too: a third try is possible.
    assert fresh.replayable()
    assert fresh.replay().upload is not None


def test_a_body_not_yet_ended_is_replayed_and_goes_on() -> None:
    s = upload(b"ab")
    s.hold(1024)
    fresh = s.replay()
    assert fresh.upload is not None
    assert not fresh.upload.ended
    fresh.feed(b"cd")
    assert b"".join(fresh.upload.buf) == b"abcd"


def test_a_body_past_the_limit_is_not_held() -> None:
    s = upload(b"x" * 600)
    s.hold(1024)
    assert s.replayable()
    s.feed(b"y" * 600)
    assert not s.replayable()
    big = upload(b"x" * 2000)
    big.hold(1024)
    assert not big.replayable()
    # Never held (a rule without retries): not replayable either.
    assert not upload(b"x").replayable()


def answered(
    status: str | None, trailers: list[tuple[str, str]], data: bytes = b""
) -> CallerStream:
    s = CallerStream(LIMITS, keep_alive=True)
    s.complete = True
    s.response_headers = {} if status is None else {"grpc-status": status}
    s.trailers = trailers
    if data:
        s.pending.append(data)
    return s


@pytest.mark.parametrize(
    ("outcome", "reply", "streamed", "status"),
    [
        # A trailers-only answer (its status in the head), or trailers with the head.
        (outbound.STREAMED, None, answered("14", []), 14),
        (outbound.STREAMED, None, answered(None, [("grpc-status", "8")]), 8),
        # A message went with it: the response began, nothing to retry.
        (outbound.STREAMED, None, answered(None, [("grpc-status", "14")], b"msg"), None),
        # The mesh's own answers, as edge.h2 tells the client.
        (503, Reply("", "", b"", {codec.H_ERROR: "overloaded"}), None, 14),
        (504, Reply("", "", b"", {codec.H_ERROR: "app_timeout"}), None, 4),
        (resilience.NO_RESPONDERS, None, None, 14),
        (resilience.UNDELIVERED, None, None, 14),
        (resilience.TIMEOUT, None, None, 4),
        ("aborted", None, None, 14),
        # The client left, or the caller's own side: never.
        ("cut", None, None, None),
        (resilience.CANCELLED, None, None, None),
        (resilience.UNAVAILABLE, None, None, None),
    ],
)
def test_the_grpc_status_of_a_try(
    outcome: str | int, reply: Reply | None, streamed: CallerStream | None, status: int | None
) -> None:
    assert outbound._grpc_status(outcome, reply, streamed) == status


def test_a_response_head_without_its_end_is_committed() -> None:
    s = answered("14", [])
    s.complete = False
    assert outbound._grpc_status(outbound.STREAMED, None, s) is None
