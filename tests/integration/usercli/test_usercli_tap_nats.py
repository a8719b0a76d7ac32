"""``natsmesh tap`` when NATS goes away under it: an error it names, not a traceback."""

from __future__ import annotations

import asyncio

import nats
import pytest

from natsmesh_operator.usercli import tap
from tests.fixtures.nats_server import NatsServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def test_losing_nats_mid_tap_ends_it_with_a_message(nats_server: NatsServer) -> None:
    # The options run() connects with (one reconnect attempt, then closed).
    nc = await nats.connect(
        nats_server.url,
        allow_reconnect=True,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.1,
        connect_timeout=3,
    )
    warnings: list[str] = []
    task = asyncio.create_task(
        tap.stream(
            nc,
            "shop",
            "orders",
            lambda _: None,
            limits=tap.Limits(duration=20),
            stop=asyncio.Event(),
            warn=warnings.append,
        )
    )
    await asyncio.sleep(0.3)  # the first control message is out
    assert not task.done()
    nats_server.stop()
    # Next renewal within RENEW_SECONDS; then the error, well before --duration.
    with pytest.raises(tap.TapError, match="lost the connection to NATS") as err:
        await asyncio.wait_for(task, timeout=tap.RENEW_SECONDS + 5)
    assert err.value.code == tap.EXIT_FAILED
    await nc.close()
