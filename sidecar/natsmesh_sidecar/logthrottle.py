"""At most one log line per key and interval, with a count of what was held back.

A sidecar that cannot reach NATS retries four times a second; each failed
attempt raises the same async error. Logging each one floods the pod's log
(and whatever ships it) without saying more than the first line did.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class LogThrottle:
    """``allow(key)`` is the number of lines held back since the last one
    logged for ``key`` (0 or more) when a line may be logged now, else None."""

    def __init__(self, interval: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if len(self._last) > 256:  # keys are error kinds; bound them anyway
            self._last.clear()
        self._last[key] = now
        return self._held.pop(key, 0)
