"""SIGTERM stops the operator without waiting out API errors (main.stop_on_sigterm)."""

from __future__ import annotations

import asyncio
import os
import signal

import kopf

from natsmesh_operator.main import EXIT_BACKOFFS, stop_on_sigterm


async def test_sigterm_sets_the_stop_flag_and_shortens_the_api_retries() -> None:
    settings = kopf.OperatorSettings()
    running = tuple(settings.networking.error_backoffs)  # type: ignore[arg-type]
    assert sum(running) > 30  # kopf's default: an API server restart is waited out
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stop_on_sigterm(settings, stop)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    assert settings.networking.error_backoffs == EXIT_BACKOFFS
    assert sum(EXIT_BACKOFFS) <= 1
