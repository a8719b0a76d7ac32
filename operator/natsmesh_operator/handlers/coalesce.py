"""Per-key coalescing of work that events ask for in bursts.

A scale from 3 to 100 pods is 97 connect advisories in a few seconds; each
asks "recount this namespace". The work (a ``$SRV.PING`` and a status patch
per service whose count changed) must follow the last of them quickly, yet
run far fewer than 97 times: a :class:`Coalescer` runs it once per burst,
and never more often than once per ``gap`` seconds for one key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from natsmesh_operator.handlers.background import cancel

logger = logging.getLogger(__name__)


class Coalescer:
    """Runs ``work(key)`` after ``mark(key)``, folding the marks of a burst into one run.

    A mark starts a run ``settle`` seconds later (so the rest of a burst
    joins it); marks arriving during the settle or the run are served by one
    more run, which starts no sooner than ``gap`` seconds after the previous
    run of that key started.
    """

    def __init__(
        self, work: Callable[[str], Awaitable[None]], *, settle: float, gap: float
    ) -> None:
        self.work = work
        self.settle = settle
        self.gap = gap
        self.runs = 0
        self._dirty: set[str] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._last: dict[str, float] = {}
        self._later: set[asyncio.TimerHandle] = set()
        self._stopped = False

    def mark(self, key: str, *, again_after: float | None = None) -> None:
        """Ask for a run of ``key``; with ``again_after``, another that many seconds later."""
        if self._stopped:
            return
        self._dirty.add(key)
        task = self._tasks.get(key)
        if task is None or task.done():
            self._tasks[key] = asyncio.create_task(self._run(key), name=f"coalesce-{key}")
        if again_after is not None:
            loop = asyncio.get_running_loop()
            handle: asyncio.TimerHandle | None = None

            def fire() -> None:
                if handle is not None:
                    self._later.discard(handle)
                self.mark(key)

            handle = loop.call_later(again_after, fire)
            self._later.add(handle)

    def ran_within(self, key: str, seconds: float) -> bool:
        """Whether a run of ``key`` started less than ``seconds`` ago."""
        return time.monotonic() - self._last.get(key, float("-inf")) < seconds

    def pending(self) -> bool:
        """Whether a run is waiting or running (for tests and shutdown)."""
        return any(not t.done() for t in self._tasks.values())

    async def _run(self, key: str) -> None:
        while key in self._dirty:
            since = time.monotonic() - self._last.get(key, float("-inf"))
            await asyncio.sleep(max(self.settle, self.gap - since))
            # Marks from here on need a run that starts after this one.
            self._dirty.discard(key)
            self._last[key] = time.monotonic()
            self.runs += 1
            try:
                await self.work(key)
            except asyncio.CancelledError:
                raise
            except Exception:  # one key's failure must not stop the others
                logger.exception("coalesced work for %s failed", key)

    async def stop(self) -> None:
        self._stopped = True
        for handle in self._later:
            handle.cancel()
        self._later.clear()
        await cancel(*self._tasks.values())
        self._tasks.clear()
