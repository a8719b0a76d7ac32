"""The sidecar process: wiring, NATS connection, table hot swap, creds reload, drain.

:class:`Sidecar` owns every part and is what tests run in-process::

    sidecar = Sidecar(settings, table=table)
    await sidecar.start()
    ...
    await sidecar.stop()        # the SIGTERM drain

Start order: admin server (probes answer at once, not ready yet), outbound
listener (the app may start calling; requests fail fast with 503 until NATS is
up), app readiness checks, NATS connection, micro discovery, table watch.
The service's queue group (request subscriptions) and its event consumers are
joined only while the app passes its readiness check (see readiness.py), left
after it fails it, and left first on SIGTERM. Ready means connected and joined.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

from nats import errors as nats_errors
from nats.aio.client import Client as NatsClient

from natsmesh_sidecar import codec, readiness, subjects
from natsmesh_sidecar.calls.inbound import InboundHandler, InboundLimits
from natsmesh_sidecar.calls.outbound import OutboundHandler
from natsmesh_sidecar.calls.route import Planner
from natsmesh_sidecar.edge.appclient import AppPool
from natsmesh_sidecar.edge.listener import OutboundServer
from natsmesh_sidecar.events.consumer import ConsumerContext, EventConsumer
from natsmesh_sidecar.events.publisher import EventPublisher
from natsmesh_sidecar.logthrottle import LogThrottle
from natsmesh_sidecar.observe import accesslog
from natsmesh_sidecar.observe.metrics import AdminServer, Metrics
from natsmesh_sidecar.policy import permissions, resilience
from natsmesh_sidecar.policy.table import KvWatch, Router, empty_table, read_bytes, watch_file
from natsmesh_sidecar.policy.targets import TargetCache
from natsmesh_sidecar.transport.micro import MicroService
from natsmesh_sidecar.transport.natsfast import FastPath, Reply, violation_subject
from natsmesh_sidecar.wire import (
    CircuitBreaker,
    Delivery,
    Settings,
    coerce_table,
    invalid_subject,
    parse_table,
)

if TYPE_CHECKING:
    from natsmesh_sidecar.observe.tap import Tap
    from natsmesh_sidecar.observe.tracing import Tracer

logger = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 1024 * 1024
#: Connections tried when moving off a server in lame duck mode, and the
#: seconds each may take (its client listener is closed: a connection that
#: reaches it, e.g. through a Service, is refused and the next server tried).
MOVE_ATTEMPTS = 5
MOVE_CONNECT_SECONDS = 5.0
#: Bound of each step of a make-before-break move (subscribing and flushing
#: on the new connection, unsubscribing and flushing the old, closing it): a
#: step that does not finish in time is logged and the move carries on or
#: backs out, it never holds the creds watch or the membership lock.
MOVE_STEP_SECONDS = 5.0
#: Longest wait before trying again to take up creds the server refused.
CREDS_RETRY_MAX_SECONDS = 60.0
#: Room kept for NATS headers when deciding 413 up front: the server counts
#: headers and payload against max_payload together.
HEADER_ROOM = 16 * 1024


class Sidecar:
    def __init__(
        self,
        settings: object,
        table: object | None = None,
        *,
        access_log: bool = True,
        header_timeout: float = 10.0,
        idle_timeout: float | None = None,
        creds_poll: float = 2.0,
        table_poll: float = 1.0,
    ) -> None:
        # config.SidecarSettings / config.MeshTable (tests, tools) are accepted
        # and converted: the sidecar itself runs on the pydantic-free wire types.
        settings = self.settings = Settings.coerce(settings)
        self.source = subjects.host_of(settings.namespace, settings.service)
        self.subject = subjects.request_subject(
            settings.namespace, settings.service, settings.version
        )
        self.instance_id = uuid.uuid4().hex[:22]
        self.access_log = access_log
        self.creds_poll = creds_poll
        self.table_poll = table_poll
        self.metrics = Metrics()
        #: Spans of each hop, only with an OTLP endpoint: the handlers test
        #: ``tracer is None`` and nothing of tracing is imported otherwise.
        self.tracer: Tracer | None = None
        if settings.otlp_endpoint:
            from natsmesh_sidecar.observe.tracing import Tracer

            self.tracer = Tracer.create(
                settings.otlp_endpoint,
                service=settings.service,
                namespace=settings.namespace,
                version=settings.version,
                instance=self.instance_id,
                ratio=settings.trace_sample_ratio,
                registry=self.metrics.registry,
            )
        self._static_table = None if table is None else coerce_table(table)
        self.router = Router(
            self._static_table or empty_table(settings.namespace, settings.service)
        )
        self.permissions = permissions.Permissions.allow_all()
        self.nc: Any = None
        self.fast: FastPath | None = None
        #: The grant of the connection in use: what it serves, what the
        #: metrics show, what ``permissions`` says it may call.
        self.creds: permissions.Creds | None = None
        #: The newest creds read: what a connect signs with (a reconnect of the
        #: current connection too). Ahead of ``creds`` while a take-up is
        #: pending, e.g. after the server refused them.
        self.signing_creds: permissions.Creds | None = None
        self.kv_watch: KvWatch | None = None
        #: Policies of our namespace's services, read on first call (KV mode only).
        self.targets: TargetCache | None = None
        self._js: Any = None
        #: Request subscriptions by subject (one per admitted caller group).
        self.serving: dict[str, Any] = {}
        self._refused = 0
        #: Request subject -> its caller (:meth:`_caller_of`).
        self._callers: dict[str, tuple[str, str, str]] = {}
        self.breakers: dict[str, resilience.Breaker] = {}
        self.events = EventPublisher(
            self, source=self.source, metrics=self.metrics, tracer=self.tracer
        )
        self.pool = AppPool(
            settings.app_host,
            settings.app_port,
            settings.max_inflight,
            idle_timeout=settings.app_idle_timeout_seconds,
            stream_limits=settings.stream_limits(),
            inline_max=self.max_body,
        )
        self.event_context = ConsumerContext(
            self,
            self.pool,
            self.metrics,
            source=self.source,
            app_host=f"{settings.app_host}:{settings.app_port}",
            dedup=settings.event_dedup,
            tracer=self.tracer,
            access_log=access_log,
        )
        self.inbound = InboundHandler(
            self.pool,
            limits=InboundLimits(
                max_inflight=settings.max_inflight,
                max_bytes=settings.inbound_max_bytes,
                max_timeout_s=settings.inbound_timeout_seconds,
            ),
            metrics=self.metrics,
            source=self.source,
            version=settings.version,
            app_host=f"{settings.app_host}:{settings.app_port}",
            fast=lambda: self.fast,
            access_log=access_log,
            app_failed=self._app_failed,
            tracer=self.tracer,
            may_stream=self._may_stream,
            app_protocol=settings.app_protocol,
        )
        self.outbound_handler = OutboundHandler(
            self,
            Planner(
                self,
                namespace=settings.namespace,
                service=settings.service,
                metrics=self.metrics,
                breaker=self.breaker,
                tracer=self.tracer,
            ),
            metrics=self.metrics,
            publish_event=self.events.publish_http,
            stream_limits=settings.stream_limits(),
            tracer=self.tracer,
            access_log=access_log,
        )
        self.outbound = OutboundServer(
            self.outbound_handler,
            metrics=self.metrics,
            source=self.source,
            max_body=self.max_body,
            stream_limits=settings.stream_limits(),
            header_timeout=header_timeout,
            idle_timeout=settings.idle_timeout_seconds if idle_timeout is None else idle_timeout,
        )
        self.admin = AdminServer(
            self.metrics,
            self.healthy,
            self.ready,
            prestop=self.prepare_stop,
            prestop_token=settings.prestop_token,
        )
        # Read at scrape time: no lock and no call per request.
        self.metrics.inflight_out.set_function(lambda: float(self.outbound_handler.inflight))
        self.metrics.inflight_in.set_function(lambda: float(self.inbound.pending()))
        self.metrics.creds_expiry.set_function(
            lambda: float(self.creds.expires) if self.creds is not None else 0.0
        )
        self.metrics.creds_issued.set_function(
            lambda: float(self.creds.issued) if self.creds is not None else 0.0
        )
        self.micro = MicroService(
            name=settings.service,
            instance_id=self.instance_id,
            subject=self.subject,
            queue_group=subjects.queue_group(settings.service),
            metadata={
                "namespace": settings.namespace,
                "version": settings.version,
                "natsmesh.io/sidecar": "true",
            },
            stats=self._micro_stats,
            serving=lambda: self.joined,
        )
        #: natsmesh_sidecar.observe.tap.Tap while someone taps this service, else None
        #: (the request paths check only this). Imported on the first control message.
        self.tap: Tap | None = None
        self._tapper: Any = None
        self._tap_sub: Any = None
        self.consumers: dict[tuple[str, str], EventConsumer] = {}
        #: In the queue group (request subscriptions made); the app passed
        #: its check, the connection is up, not draining.
        self.joined = False
        self.app_ready: readiness.AppReadiness | None = None
        if settings.ready_check != readiness.NONE:
            self.app_ready = readiness.AppReadiness(
                self._check_app,
                self._app_changed,
                period=settings.ready_period_seconds,
                failure_threshold=settings.ready_failure_threshold,
            )
        #: Joins and leaves (the readiness timer, connect, renewal, drain) one at a time.
        self._membership = asyncio.Lock()
        #: Moves to a new connection (creds renewal, lame duck) one at a time.
        self._moving = asyncio.Lock()
        self.outbound_port = 0
        self.admin_port = 0
        self.draining = False
        #: The pod is stopping (the app's preStop hook called /prestop): out
        #: of the queue group while the app finishes, until our SIGTERM.
        self.stopping = False
        #: A preStop was honoured and not re-armed since (by an app restart).
        self._prestop_spent = False
        self._app_down_since_prestop = False
        self._hold: asyncio.Task[None] | None = None
        #: Event consumers being closed: a preStop waits for their deliveries.
        self._closing: set[asyncio.Task[None]] = set()
        self.stopped = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._async_errors: list[str] = []
        self._error_log = LogThrottle()

    # -- state used by the handlers -------------------------------------------

    def max_body(self) -> int:
        nc = self.nc
        limit = (nc.max_payload if nc is not None else 0) or DEFAULT_MAX_PAYLOAD
        return int(limit) - HEADER_ROOM

    def js(self, prefix: str = subjects.JS_API_PREFIX) -> Any:
        """A JetStream context on the current connection (per API prefix, cached)."""
        cache = self._js
        if cache is None or cache[0] is not self.nc:
            cache = self._js = (self.nc, {})
        ctx = cache[1].get(prefix)
        if ctx is None:
            ctx = cache[1][prefix] = self.nc.jetstream(prefix=prefix)
        return ctx

    def breaker(self, subject: str, config: CircuitBreaker | None) -> resilience.Breaker | None:
        if config is None:
            return None
        b = self.breakers.get(subject)
        if b is None or b.config != config:
            b = self.breakers[subject] = resilience.Breaker(config)
            # Read at scrape time: the state a call would find now, not the
            # one the last completed call left.
            breaker = b
            self.metrics.circuit.labels(subject).set_function(
                lambda: breaker.state_at(time.monotonic())
            )
            self.metrics.circuit_refused.labels(subject)  # 0 until a call is refused
        return b

    def healthy(self) -> bool:
        return not self.stopped.is_set()

    def ready(self) -> bool:
        nc = self.nc
        return (not self.draining) and nc is not None and nc.is_connected and self.joined

    def _micro_stats(self) -> dict[str, Any]:
        ib = self.inbound
        return {
            "num_requests": ib.served,
            "num_errors": ib.errors,
            "last_error": ib.last_error,
            "processing_time": ib.processing_ns,
            "data": {"table": self.router.table.generation, "inflight": ib.inflight},
        }

    # -- table ----------------------------------------------------------------

    def apply_table(self, table: object) -> None:
        """Swap in a table (a wire.MeshTable, or a config.MeshTable from tests/tools)."""
        table = coerce_table(table)
        s = self.settings
        if table.namespace != s.namespace or table.service != s.service:
            logger.error(
                "route table for %s.%s ignored: this sidecar is %s",
                table.service,
                table.namespace,
                self.source,
            )
            return
        for dest in table.destinations.values():
            bad = invalid_subject(dest.rules)
            if bad is not None:
                logger.error("route table rejected: invalid subject %r", bad)
                return
        self.router = Router(table)
        self.metrics.table_swaps.inc()
        logger.info(
            "route table %s applied (%d destinations)",
            table.generation or "-",
            len(table.destinations),
        )
        if self.nc is not None:
            self._sync_consumers()

    def _delete_table(self) -> None:
        self.apply_table(empty_table(self.settings.namespace, self.settings.service))

    def _sync_consumers(self) -> None:
        if self.draining:
            return
        # Events are mesh traffic too: delivered only while the app is ready
        # (a delivery to an app not listening would use up its maxDeliver).
        wanted: dict[tuple[str, str], Delivery] = {
            (d.stream, d.consumer): d for d in self.router.table.subscriptions if self.joined
        }
        for key, consumer in list(self.consumers.items()):
            if key not in wanted or consumer.d != wanted[key]:
                del self.consumers[key]
                closing = self._spawn(consumer.close(self.settings.drain_seconds))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        for key, d in wanted.items():
            if key not in self.consumers:
                c = self.consumers[key] = EventConsumer(self.event_context, d)
                c.start()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)
        return task

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        accesslog.setup(self.access_log)
        if s.creds_file:
            self.creds = self.signing_creds = permissions.Creds.read(s.creds_file)
            self.permissions = self.creds.permissions
            self.micro.reply_prefix = subjects.OPERATOR_INBOX_ROOT + "."
        if self._static_table is None and s.table_file:
            applied: float | None = None
            try:
                mtime = os.stat(s.table_file).st_mtime
                self.apply_table(parse_table(read_bytes(s.table_file)))
                applied = mtime
            except (OSError, ValueError) as exc:
                logger.error("table file %s unusable at start: %s", s.table_file, exc)
            self._spawn(
                watch_file(s.table_file, self.apply_table, self.table_poll, self._stop, applied)
            )
        elif self._static_table is not None:
            self.apply_table(self._static_table)
        self.admin_port = await self.admin.start(s.admin_host, s.admin_port)
        self.outbound_port = await self.outbound.start(s.listen_host, s.listen_port)
        logger.info(
            "sidecar %s: outbound on %s:%d, admin on %s:%d, app at %s:%d",
            self.source,
            s.listen_host,
            self.outbound_port,
            s.admin_host,
            self.admin_port,
            s.app_host,
            s.app_port,
        )
        if self.app_ready is not None:
            self._spawn(self.app_ready.run(self._stop))
        self._spawn(self._connect_loop())
        if s.creds_file:
            self._spawn(self._watch_creds(s.creds_file))
        if self.tracer is not None:
            self._spawn(self.tracer.exporter.run(self._stop))

    async def wait_ready(self, within: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not self.ready():
            if loop.time() > deadline:
                raise TimeoutError("sidecar not ready")
            await asyncio.sleep(0.01)

    def _configured_servers(self) -> list[str]:
        """``nats_url``: one URL (a Service in front of the cluster) or a comma-separated list."""
        return [u.strip() for u in self.settings.nats_url.split(",") if u.strip()]

    def _options(self, box: list[Any], servers: list[str] | None = None) -> dict[str, Any]:
        """Connection options; the state callbacks act only while ``box[0]`` is
        the current connection (an old one being drained must not touch it)."""
        s = self.settings

        def current() -> bool:
            return bool(box) and box[0] is self.nc

        async def disconnected() -> None:
            if current():
                await self._on_disconnected()

        async def reconnected() -> None:
            if current():
                await self._on_reconnected()

        async def closed() -> None:
            if current():
                await self._on_closed()

        async def lame_duck() -> None:
            if current():
                self._on_lame_duck(box[0])

        opts: dict[str, Any] = {
            "servers": servers or self._configured_servers(),
            "name": f"natsmesh-sidecar {self.source}",
            "error_cb": self._on_error,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "closed_cb": closed,
            "lame_duck_mode_cb": lame_duck,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
            "connect_timeout": 2,
            "ping_interval": 10,
            "skip_subject_validation": True,
            # The user may only read replies under its own inbox prefix.
            "inbox_prefix": subjects.inbox_prefix(s.service),
        }
        if self.signing_creds is not None:
            # Signed from the in-memory copy checked when the file was read.
            opts["user_jwt_cb"] = self._user_jwt
            opts["signature_cb"] = self._sign
        return opts

    async def _open(self, *, retry: bool = True) -> Any:
        """A new connection (retrying until the server is there unless not ``retry``).

        Without ``retry`` the connect is bounded by
        :data:`MOVE_CONNECT_SECONDS`: with ``max_reconnect_attempts=-1``
        nats.py's own connect never gives up on a server that refuses it
        (new creds it does not accept yet), and a creds take-up would wait
        for it forever, holding the creds watch.
        """
        box: list[Any] = []
        while not self._stop.is_set():
            try:
                nc = await _connect(self._options(box), None if retry else MOVE_CONNECT_SECONDS)
                box.append(nc)
                return nc
            except Exception as exc:
                why = str(exc) or type(exc).__name__
                logger.warning("NATS connect to %s failed: %s", self.settings.nats_url, why)
                if not retry:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.5)
        return None

    async def _serve_on(
        self, nc: Any, join: bool, creds: permissions.Creds | None
    ) -> tuple[FastPath, dict[str, Any]]:
        """A fast path on ``nc``, subscribed to our requests if ``join``."""
        fast = FastPath(nc)
        await fast.start(subjects.inbox_prefix(self.settings.service))
        return fast, await self._subscribe(fast, creds) if join else {}

    async def _subscribe(self, fast: FastPath, creds: permissions.Creds | None) -> dict[str, Any]:
        return {
            subject: await fast.subscribe(subject, queue, self._on_request)
            for subject, queue in self._serve_wanted(creds).items()
        }

    # -- queue-group membership ---------------------------------------------------

    def _app_passes(self) -> bool:
        """The app passes its readiness check (or the sidecar has none)."""
        return self.app_ready is None or self.app_ready.ready

    def _want_joined(self) -> bool:
        return not self.draining and not self.stopping and self._app_passes()

    async def prepare_stop(self) -> bool:
        """The pod is stopping: the kubelet runs the app container's preStop
        hook (``GET /prestop``) and sends the app SIGTERM only once it returns.

        A native sidecar gets its own SIGTERM only after the app has exited,
        so without this the app closes its listener while we are still in the
        queue group, and requests routed here meanwhile are refused (a
        ``502 app_unreachable`` once the caller's retries run out: the kind
        tier's scale-down saw one in 493). So: leave the queue group and the
        event consumers now (and wait for a connection move under way, whose
        old connection is still subscribed), then wait, at most
        ``prestop_wait_seconds``, until the app has answered what it holds.
        The outbound listener stays open: the app may call out while it
        finishes.

        The kubelet also runs the hook when it restarts only the app (a
        failed liveness probe): the app going down and passing its check
        again ends the stop, and arms the hook again. Without SIGTERM or
        restart, we join again after ``prestop_hold_seconds``, and a later
        call is refused (False) until the app is seen restarting: whoever can
        read the pod spec, and so the token, can take a replica out once per
        app lifetime, not again and again.
        """
        if self.draining:
            return True
        if self._prestop_spent and not self.stopping:
            logger.warning("preStop hook called again with no app restart since the last: refused")
            return False
        loop = asyncio.get_running_loop()
        s = self.settings
        deadline = loop.time() + min(s.drain_seconds, s.prestop_wait_seconds)
        if not self.stopping:
            self.stopping = self._prestop_spent = True
            # An app already down when the hook came and ready later restarted too.
            self._app_down_since_prestop = not self._app_passes()
            logger.info("pod stopping (preStop hook): leaving the queue group before the app stops")
            self._hold = self._spawn(self._end_stop_hold())
        await self._sync_membership()
        if self._moving.locked():
            # A move's old connection stays subscribed until the move ends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, deadline - loop.time())), self._moving:
                    pass
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=max(0.05, deadline - loop.time()))
        while self.inbound.pending() > 0 and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        logger.info("preStop done: %d calls into the app still open", self.inbound.pending())
        return True

    async def _end_stop_hold(self) -> None:
        await asyncio.sleep(self.settings.prestop_hold_seconds)
        if self.draining:
            return
        logger.warning(
            "no SIGTERM %.0fs after the preStop hook: joining the queue group again",
            self.settings.prestop_hold_seconds,
        )
        self.stopping = False
        await self._sync_membership()

    def _prestop_seen_app(self, ready: bool) -> None:
        """After a preStop: the app down, then ready again, is a restarted app
        container (the pod goes on): end the stop and arm the hook again."""
        if not self._prestop_spent:
            return
        if not ready:
            self._app_down_since_prestop = True
            return
        if not self._app_down_since_prestop:
            return
        logger.info("the app restarted after the preStop hook: the pod goes on, joining again")
        self.stopping = self._prestop_spent = self._app_down_since_prestop = False
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None

    async def _check_app(self) -> bool:
        s = self.settings
        return await readiness.check_once(
            s.app_host, s.ready_port or s.app_port, s.ready_check, s.ready_timeout_seconds
        )

    def _app_failed(self) -> None:
        if self.app_ready is not None and self.joined:
            self.app_ready.kick()

    async def _app_changed(self, ready: bool) -> None:
        s = self.settings
        self._prestop_seen_app(ready)
        if ready:
            logger.info("app ready (%s check, port %d)", s.ready_check, s.ready_port or s.app_port)
        else:
            logger.warning(
                "app failed its %s check %d times in a row: leaving the queue group",
                s.ready_check,
                s.ready_failure_threshold,
            )
        await self._sync_membership()

    async def _sync_membership(self) -> None:
        """Join or leave the queue group (and the event consumers) as wanted."""
        async with self._membership:
            fast = self.fast
            if fast is None:
                return  # the connect loop joins once connected
            if self._want_joined() and not self.joined:
                serving = await self._subscribe(fast, self.creds)
                # Joined once the server has the subscriptions (a reconnect
                # in between resends them: nats-py keeps them).
                with contextlib.suppress(Exception):
                    await self.nc.flush(timeout=5)
                self.serving, self.joined = serving, True
                logger.info("joined the queue group: serving %s", sorted(serving))
                self._sync_consumers()
            elif not self._want_joined() and self.joined:
                await self._leave()

    async def _leave(self) -> None:
        """Unsubscribe, then a round trip: every request the server routed to
        us before it took the UNSUBs has been read and is being served."""
        self.joined = False
        serving, self.serving = self.serving, {}
        for sub in serving.values():
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=5)
        logger.info("left the queue group")
        self._sync_consumers()

    async def _connect_loop(self) -> None:
        """Connect, then subscribe everything."""
        s = self.settings
        # Labelled with the creds read before connecting: if newer ones come
        # while it retries, the connect may sign with those, and the creds
        # watch, which waits for a connection, then moves to a connection
        # labelled right (one move too many, never a grant mislabelled as newer).
        creds = self.signing_creds
        nc = await self._open()
        if nc is None:
            return
        async with self._membership:
            join = self._want_joined()
            listening = await self._listen_on(nc, join, creds)
            fast, serving, self._tap_sub, self.micro.subs[:] = listening
            # Ready only once the server has our subscriptions (flushed).
            self._use(nc, fast, serving, join, creds)
        logger.info(
            "connected to %s; %s",
            s.nats_url,
            f"serving {sorted(serving)}" if self.joined else "joining once the app is ready",
        )
        if self._static_table is None and not s.table_file:
            self.targets = TargetCache(s.namespace, account=self.signer)
            try:
                await self.targets.start(nc)
            except Exception as exc:
                logger.error("target watch failed: %s", exc)
            self.kv_watch = KvWatch(
                s.service,
                self.apply_table,
                self._delete_table,
                account=self.signer,
            )
            try:
                await self.kv_watch.start(nc)
            except Exception as exc:
                logger.error("route table watch on %s failed: %s", self.kv_watch.subject, exc)
        self._sync_consumers()

    async def _renew(self) -> bool:
        """Take up new creds without failing a request: make before break
        (see :meth:`_move_to`). A forced reconnect instead failed every call
        in flight and every call of the gap. False: not taken up (yet)."""
        async with self._moving:
            creds = self.signing_creds
            if self.nc is None or self.draining:
                return True
            if creds is None or (self.creds is not None and self.creds.jwt == creds.jwt):
                return True  # in use already (the connect took them, or the file came back)
            nc = await self._open(retry=False)
            if nc is None:
                logger.error(
                    "new creds: connecting with them failed; keeping the current connection"
                )
            elif await self._move_to(nc, "creds renewed", creds):
                self.metrics.creds_renewals.inc()
                return True
            # The old connection carries on (and re-signs with the new creds
            # if the server ever drops it); the creds watch tries again.
            self.metrics.creds_renewal_failures.inc()
            return False

    def _on_lame_duck(self, nc: Any) -> None:
        """Our server entered lame duck mode (it is about to stop): move to
        another before it drops us, the way new creds are taken up."""
        if self.draining:
            return
        url = nc.connected_url
        server_id = (getattr(nc, "_server_info", None) or {}).get("server_id")
        logger.info("NATS server %s is in lame duck mode: moving to another", url and url.netloc)
        self._spawn(self._leave_lame_duck(nc, url.netloc if url else "", server_id))

    async def _leave_lame_duck(self, old_nc: Any, netloc: str, server_id: str | None) -> None:
        async with self._moving:
            if self.nc is not old_nc or self.draining:
                return  # moved already (a renewal, an earlier notice)
            creds = self.signing_creds  # what the new connection signs with
            nc = await self._open_elsewhere(old_nc, netloc, server_id)
            if nc is None:
                # The server drops us at the end of its grace period; the
                # connection then reconnects elsewhere by itself.
                logger.error("no other NATS server reachable; staying until dropped")
                self.metrics.lame_duck_move_failures.inc()
                return
            moved = await self._move_to(nc, f"left lame-duck server {netloc}", creds)
            if moved:
                self.metrics.lame_duck_moves.inc()
            else:
                self.metrics.lame_duck_move_failures.inc()

    async def _open_elsewhere(self, old_nc: Any, netloc: str, server_id: str | None) -> Any:
        """A connection to any known server but the one at ``netloc`` / ``server_id``.

        Known: the configured URLs and the servers the cluster announced to
        ``old_nc``. A configured URL may be a Service in front of all of them,
        the lame duck included: its listener is closed, so such a connect is
        refused and the next one tried; one that still lands there is closed.
        """
        known = [f"{u.scheme}://{u.netloc}" for u in old_nc.servers if u.netloc != netloc]
        servers = list(dict.fromkeys(known + self._configured_servers()))
        for attempt in range(MOVE_ATTEMPTS):
            box: list[Any] = []
            opts = self._options(box, servers)
            try:
                nc = await _connect(opts, MOVE_CONNECT_SECONDS)
            except Exception as exc:
                logger.warning("moving off %s: connect failed (%s)", netloc, exc)
                continue
            box.append(nc)
            landed = (getattr(nc, "_server_info", None) or {}).get("server_id")
            if server_id is None or landed != server_id:
                return nc
            logger.info("moving off %s: landed on it again (attempt %d)", netloc, attempt + 1)
            with contextlib.suppress(Exception):
                await nc.close()
        return None

    async def _move_to(self, nc: Any, why: str, creds: permissions.Creds | None) -> bool:
        """Make before break onto ``nc``, signed with ``creds``: it subscribes
        like the current connection, for what ``creds`` grant (same queue
        groups, so both share the load meanwhile); new
        calls go out on it; then the old one stops hearing requests, its calls
        in flight get their answers (bounded by the longest route timeout),
        its event deliveries in hand finish, and it closes.

        Every step on a connection is bounded (:data:`MOVE_STEP_SECONDS`). If
        the new connection cannot be set up, it is closed and the current one
        carries on (False); after the switch, a slow step of the old
        connection's teardown is logged and skipped, never waited out.
        """
        started = time.monotonic()
        old_nc, old_fast = self.nc, self.fast
        async with self._membership:
            old_serving, join = self.serving, self._want_joined()
            try:
                fast, serving, tap_sub, micro_subs = await asyncio.wait_for(
                    self._listen_on(nc, join, creds), MOVE_STEP_SECONDS
                )
            except Exception as exc:
                logger.error(
                    "%s: the new connection could not be set up (%s); keeping the current one",
                    why,
                    str(exc) or type(exc).__name__,
                )
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), MOVE_STEP_SECONDS)
                return False
            old_micro = list(self.micro.subs)
            self.micro.subs[:] = micro_subs
            if self._tap_sub is not None:
                old_micro.append(self._tap_sub)
            self._tap_sub = tap_sub
            self._use(nc, fast, serving, join, creds)
        logger.info("%s: new connection serving %s; draining the old", why, sorted(serving))
        # Bounded by their own timeouts (a flush, a 2 s direct get): waited
        # for, not cut short, or the new connection would miss table updates.
        if self.targets is not None:
            await self._step(why, "target watch", self.targets.start(nc), within=None)
        if self.kv_watch is not None:
            await self._step(why, "route table watch", self.kv_watch.start(nc), within=None)
        old_consumers = list(self.consumers.values())
        self.consumers.clear()
        self._sync_consumers()
        for sub in [*old_serving.values(), *old_micro]:
            await self._step(why, "unsubscribe", sub.unsubscribe())
        # A round trip after the UNSUBs: every request the server routed to
        # the old connection before it took them has then been read (and is
        # served; its answer goes out on the new connection). Closing before
        # it dropped the requests still in the pipe.
        await self._step(why, "old connection's flush", old_nc.flush(timeout=MOVE_STEP_SECONDS))
        grace = self.settings.drain_seconds
        await asyncio.gather(*(c.close(grace) for c in old_consumers))
        # Calls in flight on the old connection: at most the longest timeout.
        for _ in range(int(max(grace, 30.0) / 0.05)):
            if old_fast is None or not old_fast.waiters:
                break
            await asyncio.sleep(0.05)
        await self._step(why, "old connection's close", old_nc.close())
        logger.info("%s: old connection closed, %.2fs after the new one opened", why,
                    time.monotonic() - started)  # fmt: skip
        return True

    def _use(
        self,
        nc: Any,
        fast: FastPath,
        serving: dict[str, Any],
        join: bool,
        creds: permissions.Creds | None,
    ) -> None:
        """Make ``nc``, set up by :meth:`_listen_on`, the connection in use, with
        the grant of ``creds`` (under the membership lock)."""
        self.nc, self.fast, self.serving, self._js = nc, fast, serving, None
        self.joined = join
        self.creds = creds
        if creds is not None:
            self.permissions = creds.permissions
        self.metrics.nats_connected.set(1)

    async def _listen_on(
        self, nc: Any, join: bool, creds: permissions.Creds | None
    ) -> tuple[FastPath, dict[str, Any], Any, list[Any]]:
        """What the current connection listens to, on ``nc`` too, for what
        ``creds`` grant, confirmed by the server (flush): fast path, request
        subscriptions, micro, tap."""
        fast, serving = await self._serve_on(nc, join, creds)
        micro_subs = await self.micro.subscribe(nc)
        tap_sub = await self._tap_listen(nc, creds)
        await nc.flush()
        return fast, serving, tap_sub, micro_subs

    async def _step(
        self, why: str, step: str, aw: Any, within: float | None = MOVE_STEP_SECONDS
    ) -> None:
        """One step of a move after the switch: bounded, logged if it fails."""
        try:
            await asyncio.wait_for(aw, within)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            logger.warning("%s: %s failed (%s); carrying on", why, step, reason)

    # -- tap ----------------------------------------------------------------------

    async def _tap_listen(self, nc: Any, creds: permissions.Creds | None) -> Any:
        """The one idle subscription tapping costs: our tap control subject
        (every replica, no queue group), if ``creds`` allow it."""
        s = self.settings
        subject = subjects.tap_control(s.namespace, s.service)
        if creds is not None and not any(
            subjects.subject_matches(p.split(" ")[0], subject) for p in creds.subscribe
        ):
            return None  # creds from an operator without tap
        try:
            return await nc.subscribe(subject, cb=self._on_tap_control)
        except Exception as exc:
            logger.warning("tap control subscription failed: %s", exc)
            return None

    async def _on_tap_control(self, msg: Any) -> None:
        if msg.reply or msg.headers:
            # The CLI sends neither. JetStream does, when it publishes a
            # tenant's stored message (or an ack) to a reply subject the
            # tenant chose: that could otherwise start a tap of any service.
            logger.debug("tap control message with a reply or headers ignored")
            return
        tapper = self._tapper
        if tapper is None:
            from natsmesh_sidecar.observe.tap import Tap  # only once someone taps

            s = self.settings
            tapper = self._tapper = Tap(
                instance=self.instance_id,
                subject=lambda session: subjects.tap_records(s.namespace, s.service, session),
                publish=self._tap_publish,
                activate=self._set_tap,
            )
        tapper.control(msg.data)

    def _tap_publish(self, subject: str, payload: bytes) -> bool:
        fast = self.fast
        return fast is not None and fast.publish(subject, "", {}, payload)

    def _set_tap(self, tap: Tap | None) -> None:
        if (tap is None) != (self.tap is None):
            logger.info("tap %s", "started" if tap is not None else "stopped")
        self.tap = self.inbound.tap = tap

    @property
    def signer(self) -> str | None:
        """The account whose key signs our route tables (None: a dev server, no creds)."""
        return self.creds.account if self.creds is not None else None

    def _serve_wanted(self, creds: permissions.Creds | None) -> dict[str, str]:
        """Request subscriptions: exactly the callers ``creds`` let us hear."""
        if creds is not None:
            return dict(subjects.serve_subjects(creds.subscribe, self.subject))
        # No creds (a dev server without accounts): every caller.
        return {f"{self.subject}.*.*": subjects.queue_group(self.settings.service)}

    def _may_stream(self, subject: str) -> bool:
        """Whether our user may subscribe to ``subject`` (a stream's call subject)
        without a queue group."""
        creds = self.creds
        if creds is None:
            return True
        return any(
            " " not in entry and subjects.subject_matches(entry, subject)
            for entry in creds.subscribe
        )

    def _on_request(self, msg: Reply) -> None:
        """Admit a request only as from the caller its subject names (see
        subjects.reply_admissible); the source header comes from the subject."""
        caller = self._callers.get(msg.subject)
        if caller is None:
            caller = self._caller_of(msg.subject)
        if not caller[2] or not subjects.reply_admissible(
            self.settings.namespace,
            caller[0],
            caller[1],
            msg.reply,
            accounts=self.creds is not None,
        ):
            self.metrics.nats_errors.labels("request_refused").inc()
            self._refused += 1
            if self._refused in (1, 10, 100) or self._refused % 1000 == 0:
                logger.warning(
                    "dropped %d request(s) whose reply subject does not belong to the "
                    "caller named in the subject (last: %s, reply %r)",
                    self._refused,
                    msg.subject,
                    msg.reply,
                )
            return
        msg.headers[codec.H_SOURCE] = caller[2]
        self.inbound.on_msg(msg)

    def _caller_of(self, subject: str) -> tuple[str, str, str]:
        """(namespace, service, ``Nm-Source``) of the caller a request subject
        names, ``("", "", "")`` if none; cached, the same few subjects come again."""
        caller = subjects.caller_of(subject)
        found = ("", "", "") if caller is None else (*caller, subjects.host_of(*caller))
        if len(self._callers) >= 4096:
            self._callers.clear()  # subjects come from the server's wildcard matches
        self._callers[subject] = found
        return found

    def _user_jwt(self) -> bytearray:
        assert self.signing_creds is not None
        return self.signing_creds.user_jwt()

    def _sign(self, nonce: str) -> bytes:
        assert self.signing_creds is not None
        return self.signing_creds.sign(nonce)

    async def _watch_creds(self, path: str) -> None:
        """Poll the mounted creds (Secrets update in place) and take new ones
        up; a take-up that failed is tried again, less and less often."""
        last = _mtime(path)
        # When to take up the creds read last (None: taken up). A take-up
        # the server refused is tried again after `backoff` seconds, doubling
        # up to a minute: each try is a connect of up to MOVE_CONNECT_SECONDS
        # that the server logs as an auth failure.
        retry_at: float | None = None
        backoff = self.creds_poll
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.creds_poll)
            now = _mtime(path)
            if now != last and now is not None:
                last = now
                try:
                    creds = permissions.Creds.read(path)
                except (OSError, ValueError) as exc:
                    logger.error(
                        "new creds at %s unreadable (%s); keeping the current ones", path, exc
                    )
                else:
                    newest = self.signing_creds
                    if newest is None or creds.jwt != newest.jwt:
                        self.signing_creds = creds
                        retry_at, backoff = 0.0, self.creds_poll
            # Not connected yet: the take-up waits for the connection (which
            # may have signed with older creds; see _connect_loop).
            if retry_at is not None and time.monotonic() >= retry_at and self.nc is not None:
                # The new JWT may admit other callers: the new connection
                # serves exactly those.
                if await self._renew():
                    retry_at = None
                else:
                    retry_at = time.monotonic() + backoff
                    backoff = min(backoff * 2, CREDS_RETRY_MAX_SECONDS)

    async def _on_error(self, exc: Exception) -> None:
        text = str(exc)
        kind = (
            "permissions_violation"
            if "permissions violation" in text.lower()
            else type(exc).__name__
        )
        self.metrics.nats_errors.labels(kind).inc()
        self._async_errors.append(text)
        del self._async_errors[:-50]
        if kind == "permissions_violation":
            logger.error("NATS %s", text)
            found = violation_subject(text)
            if found is not None and found[0] == "publish":
                # The server refused what our JWT view allowed: answer the
                # waiting requests now (403, not a timeout) and refuse it up front.
                self.permissions.learn_denied(found[1])
                if self.fast is not None:
                    self.fast.fail_subject(found[1])
        else:
            held = self._error_log.allow(kind)
            if held is not None:
                more = f" ({held} more like it not logged)" if held else ""
                logger.warning("NATS async error: %s%s", text or kind, more)

    async def _on_disconnected(self) -> None:
        self.metrics.nats_connected.set(0)
        if self.draining:
            return
        logger.warning("NATS disconnected; requests fail fast with 503 until reconnected")
        nc = self.nc
        # Requests already sent will never get their reply on this connection:
        # fail them now instead of letting each wait out its timeout.
        if self.fast is not None:
            self.fast.fail_all()
        resp_map = getattr(nc, "_resp_map", None) or {}
        for fut in list(resp_map.values()):
            if not fut.done():
                fut.set_exception(nats_errors.ConnectionReconnectingError())

    async def _on_reconnected(self) -> None:
        self.metrics.nats_connected.set(1)
        self.metrics.nats_reconnects.inc()
        logger.info("NATS reconnected")
        if self.targets is not None:
            self.targets.reset()
        if self.kv_watch is not None and self.nc is not None and not self.draining:
            # Puts made while we were away are not replayed to a subscription.
            self.kv_watch.refresh_soon(self.nc)

    async def _on_closed(self) -> None:
        self.metrics.nats_connected.set(0)

    def inflight(self) -> int:
        consumers = sum(c.inflight for c in self.consumers.values())
        return self.outbound_handler.inflight + self.inbound.pending() + consumers

    async def stop(self) -> None:
        """Drain: take no new work, finish in-flight within the grace period, close."""
        if self.draining:
            await self.stopped.wait()
            return
        self.draining = True
        grace = self.settings.drain_seconds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        logger.info("draining (grace %.1fs, %d in flight)", grace, self.inflight())
        # Leave the queue group first: no new request is routed here.
        async with self._membership:
            await self._leave()
        await self.micro.stop()
        await asyncio.gather(
            *(c.close(max(0.0, deadline - loop.time())) for c in self.consumers.values()),
            return_exceptions=True,
        )
        # The outbound listener stays open while the app still works on what
        # we handed it: finishing a request often means calling on through us
        # (orders charging payments), and refusing that call would fail the
        # request we are draining. In-flight work is spread over connections,
        # tasks and consumers; a short poll of a counter is simpler than an
        # event per source.
        while self.inbound.pending() > 0 and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self.outbound.stop_accepting()
        while self.inflight() > 0 and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if self.inflight():
            logger.warning("drain grace over with %d requests in flight", self.inflight())
        if self.inbound.tasks:
            await asyncio.wait(list(self.inbound.tasks), timeout=max(0.05, deadline - loop.time()))
        await _drain_streams(deadline)
        self._stop.set()
        await self.outbound.close()
        if self.tracer is not None:
            # The drain's own spans too; bounded, a dead collector cannot hold it.
            await self.tracer.exporter.flush(1.0)
        if self.kv_watch is not None:
            await self.kv_watch.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        nc = self.nc
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.flush(), 1.0)
            except Exception as exc:
                logger.debug("final flush: %s", exc)
            with contextlib.suppress(Exception):
                await nc.close()
        self.pool.close()
        await self.admin.stop()
        self.stopped.set()
        logger.info("sidecar stopped")

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT, then drain; the process exit code."""
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, signalled.set)
        await self.start()
        await signalled.wait()
        logger.info("signal received")
        await self.stop()
        return 0


async def _connect(options: dict[str, Any], within: float | None) -> Any:
    """``nats.connect`` within ``within`` seconds (None: as long as it takes);
    a connect cut short is closed, not left to reconnect in the background."""
    nc = NatsClient()
    try:
        await asyncio.wait_for(nc.connect(**options), within)
    except BaseException:  # a cancelled connect (the sidecar stopping) too
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), MOVE_STEP_SECONDS)
        raise
    return nc


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


async def _drain_streams(deadline: float) -> None:
    """Let the streams in flight (bodies, Server-Sent Events, WebSockets, gRPC
    calls) end within the drain grace, as requests in flight do; then cut
    what is left, telling each other end at once (a stream that merely
    stopped would hang its peer until the idle timeout)."""
    peer = sys.modules.get("natsmesh_sidecar.transport.stream.peer")
    if peer is None:
        return  # no stream was ever opened: the module was never loaded
    loop = asyncio.get_running_loop()
    ends = peer.open_ends()
    if ends:
        logger.info("draining %d open streams", len(ends))
    while ends and loop.time() < deadline:
        await asyncio.sleep(0.05)
        ends = peer.open_ends()
    for end in ends:
        end.cut("the sidecar is shutting down")
    if ends:
        logger.warning("drain grace over: cut %d open streams", len(ends))
        # Let the aborts reach NATS before the connection closes.
        await asyncio.sleep(0)
