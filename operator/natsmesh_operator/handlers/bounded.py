"""Run a coroutine per item with bounded concurrency, without a task per item.

``asyncio.gather`` over 1,000 items behind a semaphore still creates 1,000
tasks and coroutines at once, each parked on the semaphore: a pass over
1,000 services did that twice (creds, statuses). Here ``limit`` workers
share one iterator, so only ``limit`` coroutines exist at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


async def each(items: Iterable[T], work: Callable[[T], Awaitable[R]], limit: int) -> list[R]:
    """``work(item)`` for every item, at most ``limit`` at once; results in item order.

    An exception from ``work`` propagates (cancelling the other workers), as
    with ``gather``: callers that must go on catch inside ``work``.
    """
    todo = list(enumerate(items))
    results: dict[int, R] = {}
    queue = iter(todo)

    async def worker() -> None:
        for index, item in queue:
            results[index] = await work(item)

    await asyncio.gather(*(worker() for _ in range(min(limit, len(todo)))))
    return [results[i] for i in range(len(todo))]
