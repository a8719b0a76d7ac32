"""The route-table watch reads the current table until a read succeeds.

Seen in the kwok tier with two releases on one slow NATS server: the
sidecar's first flush timed out and the table was never read, so the pod
served without routes until the operator's next put. A fake connection
stands in for NATS here (the logic under test is the retry, not the wire).
"""

from __future__ import annotations

import asyncio
from typing import Any

from natsmesh_sidecar.policy.table import KvWatch
from natsmesh_sidecar.wire import MeshTable


class Msg:
    def __init__(self, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.data = data
        self.headers = headers
        self.subject = ""


class SlowNats:
    """Flushes time out; the first ``failures`` direct gets time out too."""

    def __init__(self, failures: int, value: bytes = b"table-1") -> None:
        self.failures = failures
        self.value = value
        self.gets = 0
        self.cb: Any = None

    async def subscribe(self, subject: str, cb: Any) -> object:
        self.cb = cb
        return object()

    async def flush(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109 -- as nats-py
        raise TimeoutError("nats: flush timeout")

    async def request(self, subject: str, payload: bytes, timeout: float) -> Msg:  # noqa: ASYNC109
        self.gets += 1
        if self.gets <= self.failures:
            raise TimeoutError("nats: timeout")
        return Msg(self.value)


def watch(applied: list[bytes]) -> KvWatch:
    w = KvWatch(
        "orders",
        lambda table: applied.append(table.generation.encode()),
        lambda: applied.append(b"deleted"),
        parse=lambda data: MeshTable("shop", "orders", generation=data.decode()),
    )
    w.RETRY_FIRST = 0.01
    w.RETRY_MAX = 0.04
    return w


async def test_a_failed_first_read_is_retried_until_the_table_arrives() -> None:
    applied: list[bytes] = []
    nc = SlowNats(failures=4)
    w = watch(applied)
    await w.start(nc)  # the flush timing out does not stop the start
    assert applied == []
    for _ in range(200):
        if applied:
            break
        await asyncio.sleep(0.01)
    assert applied == [b"table-1"]
    assert nc.gets == 5
    await asyncio.sleep(0.1)
    assert nc.gets == 5, "no more reads once one succeeded"
    await w.stop()


async def test_a_put_heard_ends_the_retries_and_stop_cancels_them() -> None:
    applied: list[bytes] = []
    nc = SlowNats(failures=10**6)
    w = watch(applied)
    await w.start(nc)
    await asyncio.sleep(0.05)
    await nc.cb(Msg(b"table-2"))
    assert applied == [b"table-2"]
    await asyncio.sleep(0.1)
    gets = nc.gets
    await asyncio.sleep(0.1)
    assert nc.gets == gets, "the put said what the table is: no more reads"

    again = watch(applied)
    await again.start(nc)
    await again.stop()
    gets = nc.gets
    await asyncio.sleep(0.1)
    assert nc.gets == gets, "stopped: no more reads"


async def test_a_new_connection_replaces_the_old_ones_retries() -> None:
    applied: list[bytes] = []
    old = SlowNats(failures=10**6)
    w = watch(applied)
    await w.start(old)
    await asyncio.sleep(0.05)
    new = SlowNats(failures=0, value=b"table-3")
    await w.start(new)  # a move: its first read succeeds
    assert applied == [b"table-3"]
    gets = old.gets
    await asyncio.sleep(0.1)
    assert old.gets == gets, "nothing asks on the old connection any more"
    await w.stop()


class PutDuringGet(SlowNats):
    """A put of a newer table arrives while the direct get is on its way."""

    async def request(self, subject: str, payload: bytes, timeout: float) -> Msg:  # noqa: ASYNC109
        await self.cb(Msg(b"table-new"))
        return Msg(b"table-old")


async def test_a_put_heard_during_a_get_is_not_overwritten_by_the_get() -> None:
    applied: list[bytes] = []
    w = watch(applied)
    await w.start(PutDuringGet(failures=0))
    assert applied == [b"table-new"]
    await w.stop()
