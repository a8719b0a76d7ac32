"""The callee's byte budget and the credit its request receivers grant from it, as pure logic."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natsmesh_sidecar.transport.budget import EXTRA_SHARE, Budget, Hold
from natsmesh_sidecar.transport.stream.receiver import Receiver

pytestmark = pytest.mark.unit

CHUNK = 1000
WINDOW = 8


@dataclass
class Call:
    """One streamed request body on the callee: its receiver, its sink (the app)."""

    hold: Hold
    credit: list[int] = field(default_factory=list)
    #: Chunks written to the sink since it blocked (it holds them).
    in_sink: int = 0
    receiver: Receiver = field(init=False)

    def __post_init__(self) -> None:
        self.receiver = Receiver(
            WINDOW,
            deliver=self.deliver,
            finish=lambda: None,
            send_credit=self.credit.append,
            hold=self.hold,
        )
        self.credit.append(self.receiver.open())

    def deliver(self, data: bytes) -> None:
        if self.receiver.blocked:
            self.in_sink += 1

    def send(self, eof: bool = False) -> None:
        """The caller's next chunk (within its credit)."""
        r = self.receiver
        headers = {"Nm-Seq": str(r.expected)} | ({"Nm-Eof": "1"} if eof else {})
        r.on_chunk(headers, b"x" * CHUNK)

    def block(self, blocked: bool) -> None:
        if blocked:
            self.in_sink = 0
        self.receiver.set_blocked(blocked)

    def credit_left(self) -> int:
        return self.receiver.granted - self.receiver.expected


def test_a_call_is_refused_only_when_its_first_chunk_does_not_fit() -> None:
    budget = Budget(10 * CHUNK)
    calls = []
    while (hold := budget.hold(CHUNK)) is not None:
        calls.append(Call(hold))
    assert len(calls) == 10 - budget.extra_cap // CHUNK
    assert budget.used == budget.capacity
    # Every call may send: the first took what the extra share allows, the rest a chunk.
    assert calls[0].credit_left() == 1 + budget.extra_cap // CHUNK
    assert [c.credit_left() for c in calls[1:]] == [1] * (len(calls) - 1)
    # A call whose body ended gives its chunk back: the next one fits.
    calls[1].send(eof=True)
    assert calls[1].hold.size == 0
    assert budget.hold(CHUNK) is not None


def test_a_budget_below_one_chunk_still_takes_one_call_at_a_time() -> None:
    budget = Budget(CHUNK // 2)
    hold = budget.hold(CHUNK)
    assert hold is not None
    call = Call(hold)
    assert call.credit_left() == 1
    assert budget.hold(CHUNK) is None
    call.send(eof=True)
    assert budget.used == 0


def test_credit_grows_into_what_other_calls_gave_back() -> None:
    # Credit beyond the first chunk of each: enough for two windows.
    budget = Budget(EXTRA_SHARE * 2 * (WINDOW - 1) * CHUNK)
    first = Call(budget.hold(CHUNK) or pytest.fail("refused"))
    second = Call(budget.hold(CHUNK) or pytest.fail("refused"))
    assert first.credit_left() == second.credit_left() == WINDOW
    third = Call(budget.hold(CHUNK) or pytest.fail("refused"))
    assert third.credit_left() == 1
    for _ in range(WINDOW):
        first.send()
    first.send(eof=True)  # its whole window back
    third.send()
    assert third.credit_left() == WINDOW


def test_a_blocked_sink_keeps_what_it_holds_counted_and_gets_no_credit() -> None:
    budget = Budget(100 * CHUNK)
    call = Call(budget.hold(CHUNK) or pytest.fail("refused"))
    call.block(True)
    granted = call.receiver.granted
    for _ in range(granted):
        call.send()
    assert call.credit_left() == 0
    assert call.credit == [granted]
    assert call.hold.size == granted * CHUNK  # all of it in the sink now
    call.block(False)
    assert call.credit_left() == WINDOW
    assert call.hold.size == WINDOW * CHUNK
    # Ended while its sink still holds some: counted until the sink takes it.
    call.block(True)
    call.send()
    call.send(eof=True)
    assert call.hold.size == 2 * CHUNK
    call.block(False)
    assert call.hold.size == 0
    assert budget.used == 0


OPS = st.lists(
    st.tuples(
        st.sampled_from(["open", "send", "eof", "block", "unblock", "close"]), st.integers(0, 15)
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(capacity_chunks=st.integers(1, 40), ops=OPS)
def test_the_budget_covers_all_a_flood_of_calls_may_make_the_callee_hold(
    capacity_chunks: int, ops: list[tuple[str, int]]
) -> None:
    """Whatever the calls do, within their credit: the holds add up to the
    budget's use, which never passes its capacity; each covers the credit
    its caller has left and the chunks its sink holds; an open call whose
    sink takes what it gets always has credit."""
    budget = Budget(capacity_chunks * CHUNK)
    calls: list[Call] = []
    for op, i in ops:
        if op == "open":
            fits = budget.used + CHUNK <= budget.capacity
            hold = budget.hold(CHUNK)
            assert (hold is not None) == fits
            if hold is not None:
                calls.append(Call(hold))
            continue
        live = [c for c in calls if not c.receiver.done]
        if not live:
            continue
        call = live[i % len(live)]
        if op in ("send", "eof") and call.credit_left() > 0:
            call.send(eof=op == "eof")
        elif op in ("block", "unblock"):
            call.block(op == "block")
        elif op == "close":
            call.receiver.close()
        assert budget.used <= budget.capacity
        assert budget.used == sum(c.hold.size for c in calls)
        assert budget.extra <= budget.extra_cap
        for c in calls:
            r = c.receiver
            if r.hold is None:
                continue
            usable = 0 if r.done else c.credit_left()
            assert c.hold.size >= (usable + (c.in_sink if r.blocked else 0)) * CHUNK
            if not r.done and not r.blocked:
                assert c.credit_left() >= 1


def test_the_extra_share_is_a_part_of_the_budget() -> None:
    assert Budget(EXTRA_SHARE * CHUNK).extra_cap == CHUNK
