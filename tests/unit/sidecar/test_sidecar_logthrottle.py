"""One warning per error kind and interval, with a count of those held back."""

from __future__ import annotations

import pytest

from natsmesh_sidecar.logthrottle import LogThrottle

pytestmark = pytest.mark.unit


def test_repeats_within_the_interval_are_held_back_and_counted() -> None:
    now = [100.0]
    throttle = LogThrottle(interval=5.0, clock=lambda: now[0])
    assert throttle.allow("ConnectionRefusedError") == 0
    # A reconnect attempt every 0.25 s for 4.75 s: nothing logged.
    for _ in range(19):
        now[0] += 0.25
        assert throttle.allow("ConnectionRefusedError") is None
    # Another kind is not held back by the first.
    assert throttle.allow("TimeoutError") == 0
    now[0] += 0.25
    assert throttle.allow("ConnectionRefusedError") == 19
    now[0] += 5.0
    assert throttle.allow("ConnectionRefusedError") == 0
