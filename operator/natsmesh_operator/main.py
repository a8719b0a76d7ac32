"""``natsmesh operator``: run the kopf operator, the webhook server and metrics.

Configuration comes from ``NATSMESH_*`` variables (see
:mod:`natsmesh_operator.settings`); the Helm chart and the local test bed
set the same ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, cast

import aiohttp
import kopf

from natsmesh_operator.handlers import route, service
from natsmesh_operator.handlers.runtime import Runtime, from_memo
from natsmesh_operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

FINALIZER = "natsmesh.io/finalizer"

#: kopf's retries of a failed API call once the operator is stopping: one,
#: half a second later. While running, kopf waits out API errors for up to
#: 54 s (1+1+2+3+5+8+13+21), which keeps its watches alive through an API
#: server restart. On the way out the one call left is kopf removing this
#: replica from the peering object, and after `helm uninstall` its RBAC is
#: already gone: every try is a 403 and the pod stayed until the kubelet's
#: SIGKILL at the end of the termination grace (30 s). A peer that is not
#: removed expires by its lifetime anyway.
EXIT_BACKOFFS = (0.5,)


def stop_on_sigterm(settings: kopf.OperatorSettings, stop: asyncio.Event) -> None:
    """Take SIGTERM over from kopf's handler: stop kopf through ``stop``
    (the flag ``kopf.run`` was given) with :data:`EXIT_BACKOFFS`."""

    def on_sigterm() -> None:
        logger.info("SIGTERM: stopping (API errors are retried once from now on)")
        settings.networking.error_backoffs = EXIT_BACKOFFS
        stop.set()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)


def api_connection_limit(settings: OperatorSettings) -> int:
    """How many connections kopf may open to the API server (0: no bound).

    kopf's own session has no bound: a burst of 1,000 creates opened hundreds
    of TLS connections at once, and their buffers were most of the operator's
    peak memory. Bounded only cluster-wide: with namespace globs kopf holds
    one long watch per namespace and kind, which a fixed pool could not fit.
    """
    if settings.watch_namespaces:
        return 0
    return settings.reconcile.api_connections


def bounded_session(info: kopf.ConnectionInfo, limit: int) -> kopf.AiohttpSession:
    """kopf's session for ``info``, with at most ``limit`` connections."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(
        server=info.server,
        default_namespace=info.default_namespace,
        priority=info.priority,
        expiration=info.expiration,
        aiohttp_session=session,
    )


class BoundedLogin:
    """One bounded session per credentials (:func:`bounded_session`).

    kopf logs in again after a 401 and keeps credentials it has seen fail
    out of use (it compares them with the last few invalidated ones); if
    they are all that is left, the API call fails with ``LoginError`` and
    the operator stops. A new session object for the same token every time
    defeated that comparison: after ``helm uninstall`` deleted the service
    account, its token got 401s and the operator logged in again ~100 times
    a second until the kubelet's SIGKILL. The same token therefore gets the
    same session back; a new token (a rotated projected token) a new one.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._last: tuple[kopf.ConnectionInfo, kopf.AiohttpSession] | None = None

    def session(self, info: kopf.ConnectionInfo) -> kopf.AiohttpSession:
        if self._last is not None and self._last[0] == info:
            return self._last[1]
        session = bounded_session(info, self.limit)
        self._last = (info, session)
        return session


def build_registry(settings: OperatorSettings) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        cfg: OperatorSettings = memo.config
        settings.persistence.finalizer = FINALIZER
        # Our CRDs' status schema is strict (no `status.kopf`), so kopf keeps
        # its progress and last-handled state in annotations.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix="natsmesh.io"
        )
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="natsmesh.io", key="last-handled-configuration"
        )
        # Only warnings of kopf's own log lines become Kubernetes Events: at
        # INFO every handler and timer run posts one (66/s for 1,000 services
        # with a 15 s timer), an unbounded queue in the operator and load on
        # the API server. Our meaningful Normal events use kopf.event().
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.peering.name = cfg.peering or "natsmesh"
        settings.peering.mandatory = cfg.peering is not None
        settings.peering.standalone = cfg.peering is None
        runtime = Runtime.build(cfg, identity=memo.identity)
        memo.runtime = runtime
        await runtime.start()
        # kopf installs its own handler one loop iteration after starting
        # this handler's task, long before the awaits above return.
        stop_on_sigterm(settings, memo.stop)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        await from_memo(memo).stop()

    bounded = BoundedLogin(api_connection_limit(settings))

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.ConnectionInfo | kopf.AiohttpSession | None:
        # No Kubernetes client library is installed (lightkube is ours), so
        # kopf's own minimal login: the pod's service account, else KUBECONFIG.
        info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        if info is None or not bounded.limit:
            return info
        return bounded.session(info)

    service.register(registry, settings)
    route.register(registry, settings)
    return registry


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="natsmesh operator", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    settings = OperatorSettings.from_env()
    log_format = kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=args.verbose, log_format=log_format)
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logger.info(
        "natsmesh operator starting: %s",
        {k: v for k, v in dataclasses.asdict(settings).items() if k != "injection"},
    )
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    registry = build_registry(settings)
    # kopf's default peering identity is user@host, and getpass.getuser()
    # raises for a uid with no passwd entry (runAsUser: any number). The drift
    # loop finds this replica in the peering object by it (handlers/drift.py).
    identity = f"{socket.gethostname()}/{os.getpid()}/{int(time.time())}"
    stop = asyncio.Event()
    kopf.run(
        registry=registry,
        clusterwide=not settings.watch_namespaces,
        namespaces=settings.watch_namespaces,
        standalone=settings.peering is None,
        peering_name=settings.peering,
        priority=settings.peering_priority,
        memo=kopf.Memo(config=settings, identity=identity, stop=stop),
        stop_flag=stop,
        liveness_endpoint=None,
        # (kopf types it as a NewType of str it does not export.)
        identity=cast(Any, identity),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
