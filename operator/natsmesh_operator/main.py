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
from collections.abc import Callable
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


def request_stop(settings: kopf.OperatorSettings, stop: asyncio.Event) -> None:
    """Stop kopf through ``stop`` (the flag ``kopf.run`` was given), with
    :data:`EXIT_BACKOFFS` for the API calls still to come."""
    settings.networking.error_backoffs = EXIT_BACKOFFS
    stop.set()


def stop_on_sigterm(settings: kopf.OperatorSettings, stop: asyncio.Event) -> None:
    """Take SIGTERM over from kopf's handler: :func:`request_stop`."""

    def on_sigterm() -> None:
        logger.info("SIGTERM: stopping (API errors are retried once from now on)")
        request_stop(settings, stop)

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


class ApiLogin:
    """kopf's login: one session per credentials, a stop when they are refused.

    kopf logs in again only once every credential it holds got a 401, and
    keeps credentials equal to ones that just failed out of use (it compares
    them with the last few invalidated ones): if they are all that is left,
    API calls fail with ``LoginError``. Two consequences for a login:

    - The same token must give the same session back (:func:`bounded_session`
      makes a new object each time). A new session per login defeated the
      comparison: after ``helm uninstall`` deleted the service account, its
      token got 401s and the operator logged in again ~100 times a second
      until the kubelet's SIGKILL.
    - A login that reads the same token again means the API server refused
      it, and nothing this process does will change that. kopf would go on
      retrying every object's handlers once a second, each retry a new 401
      and a new re-login; ``on_refused`` stops the operator instead, and the
      restarted container reads the token mounted then (a refreshed
      projected one; a deleted service account's stays refused, as it
      should, until the pod goes). A rotated token is a new login, not a
      refusal. kopf also logs in again when a session was closed under it
      (``APISessionClosed``): a restart is the cure for that too.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        """At most this many API connections (0: kopf's own, unbounded)."""
        self._last: tuple[kopf.ConnectionInfo, kopf.ConnectionInfo | kopf.AiohttpSession] | None
        self._last = None

    def login(
        self, info: kopf.ConnectionInfo | None, on_refused: Callable[[], None]
    ) -> kopf.ConnectionInfo | kopf.AiohttpSession | None:
        if info is None:
            return None
        if self._last is not None and self._last[0] == info:
            logger.error(
                "the operator's credentials failed (a 401, or a closed session) and no new"
                " ones were found: stopping, to start again with the ones mounted then"
            )
            on_refused()
            return self._last[1]
        credentials = bounded_session(info, self.limit) if self.limit else info
        self._last = (info, credentials)
        return credentials


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

    api_login = ApiLogin(api_connection_limit(settings))

    @kopf.on.login(registry=registry)
    async def login(
        settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any
    ) -> kopf.ConnectionInfo | kopf.AiohttpSession | None:
        # No Kubernetes client library is installed (lightkube is ours), so
        # kopf's own minimal login: the pod's service account, else KUBECONFIG.
        found = kopf.login_with_service_account(settings=settings, **kwargs)
        info = found or kopf.login_with_kubeconfig(settings=settings, **kwargs)
        return api_login.login(info, on_refused=lambda: request_stop(settings, memo.stop))

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
