"""Whether the app can take mesh traffic: the check, and when to join or leave.

NATS queue groups do not wait for Kubernetes readiness: a sidecar subscribed
gets requests whether its app listens or not (a new pod's app 54 ms late was a
``502 app_unreachable``). So the sidecar joins its service's queue group only
once the app answers this check, and leaves it after ``failure_threshold``
failed checks in a row (one success joins again), the way a readiness probe
takes a pod out of a Service's endpoints.

The check (``NATSMESH_READY_CHECK``, filled by the webhook from the app's own
readinessProbe): ``tcp`` -- the port accepts a connection (what a pod without
a probe promises); an HTTP path -- ``GET`` answers 200-399, as a Kubernetes
``httpGet`` probe; ``none`` -- join at once.

:class:`Gate` is the pure counting (unit tested); :class:`AppReadiness` runs
checks on a timer and reports changes; :func:`check_once` is one check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

#: Anchored (pydantic's ``pattern`` searches): tcp, none, or an absolute path
#: of printable ASCII without spaces, as a probe's ``httpGet.path``.
CHECK_PATTERN = r"^(?:tcp|none|/[!-~]{0,1023})$"
TCP = "tcp"
NONE = "none"
#: The app container's preStop hook (the webhook writes it, the admin server
#: answers it): leave the queue group before the app gets its SIGTERM.
PRESTOP_PATH = "/prestop"
#: The header carrying the pod's token on that call.
PRESTOP_HEADER = "Nm-Prestop-Token"
#: A starting or failing app is checked this much more often than a ready one.
FAST_FACTOR = 5
_MAX_STATUS_LINE = 4096


class Gate:
    """Consecutive check results -> membership: join on a success, leave after
    ``failure_threshold`` failures in a row."""

    __slots__ = ("failure_threshold", "failures", "ready")

    def __init__(self, failure_threshold: int) -> None:
        self.failure_threshold = failure_threshold
        self.ready = False
        self.failures = 0

    def observe(self, ok: bool) -> bool | None:
        """The new readiness when this result changes it, else None."""
        if ok:
            self.failures = 0
            if not self.ready:
                self.ready = True
                return True
            return None
        self.failures += 1
        if self.ready and self.failures >= self.failure_threshold:
            self.ready = False
            return False
        return None

    def next_delay(self, period: float) -> float:
        """Seconds to the next check: ``period`` while steadily ready, a fifth
        of it while starting or failing (joining and leaving take few checks)."""
        if self.ready and self.failures == 0:
            return period
        return period / FAST_FACTOR


async def check_once(host: str, port: int, check: str, limit_s: float) -> bool:
    """One check of the app at ``host:port`` within ``limit_s``; never raises."""
    try:
        return await asyncio.wait_for(_check(host, port, check), limit_s)
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        return False


async def _check(host: str, port: int, check: str) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if check == TCP:
            return True
        writer.write(
            f"GET {check} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "User-Agent: natsmesh-sidecar/readiness\r\nConnection: close\r\n\r\n".encode("ascii")
        )
        await writer.drain()
        line = await reader.readuntil(b"\r\n")
        if len(line) > _MAX_STATUS_LINE:
            return False
        # "HTTP/1.1 200 OK": the status is the second word.
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return False
        return 200 <= int(parts[1]) < 400
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class AppReadiness:
    """Checks the app on a timer and calls ``changed(ready)`` on each change.

    :meth:`kick` asks for a check now: the inbound path calls it when the app
    refused or dropped a connection, so a dying app is left within a few
    fast checks rather than a period.
    """

    def __init__(
        self,
        probe: Callable[[], Awaitable[bool]],
        changed: Callable[[bool], Awaitable[None]],
        *,
        period: float,
        failure_threshold: int,
    ) -> None:
        self.probe = probe
        self.changed = changed
        self.period = max(0.05, period)
        self.gate = Gate(failure_threshold)
        self._kicked = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self.gate.ready

    def kick(self) -> None:
        self._kicked.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._kicked.clear()
            was = self.gate.ready
            change = self.gate.observe(await self.probe())
            if change is not None:
                await self.changed(change)
            elif was and self.gate.failures == 1:
                logger.info("app readiness check failed; checking again")
            waits = [
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._kicked.wait()),
            ]
            try:
                await asyncio.wait(
                    waits,
                    timeout=self.gate.next_delay(self.period),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for w in waits:
                    w.cancel()
