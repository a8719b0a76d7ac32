"""Events: durable subscriptions -> the app.

Subscriptions bind to pull consumers the operator created (the sidecar never
creates or changes them; its user may not be allowed to). A 2xx from the app
acks; anything else naks with the configured backoff; exactly-once mode waits
for the server to confirm the ack (double ack) and, before that, writes the
event's Idempotency-Key to the completed-key record, which it reads before
handing a delivery to the app (natsmesh_sidecar.events.completed); on the last
allowed delivery a failing message goes to the dead-letter subject and is
terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from nats import errors as nats_errors
from nats.js import errors as js_errors

from natsmesh_sidecar import codec, subjects
from natsmesh_sidecar.edge.appclient import AppError, AppPool
from natsmesh_sidecar.events.completed import HIT, CompletedKeys, seal_key
from natsmesh_sidecar.events.publisher import DEFAULT_KEY_PREFIX, JetStreamLink, publish_to_stream
from natsmesh_sidecar.observe import accesslog
from natsmesh_sidecar.wire import Delivery

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from natsmesh_sidecar.observe.metrics import Metrics
    from natsmesh_sidecar.observe.tracing import Tracer
    from natsmesh_sidecar.policy.permissions import Creds

logger = logging.getLogger(__name__)

#: Header names the consuming sidecar sets for the app itself; copies in the
#: message (raw ``Nm-*``, escaped ``Nm-Esc-Nm-*``, ``Nats-*``) never reach it.
_OWNED = ("nm-", "nats-")


def _sidecar_owned(name: str) -> bool:
    low = name.lower()
    return low.startswith(_OWNED) or low == "idempotency-key"


def idempotency_key(msg_id: str | None, stream: str, seq: int) -> str:
    """The key the app sees: the publisher's, or one no publisher can choose."""
    if msg_id and not msg_id.startswith(DEFAULT_KEY_PREFIX):
        return msg_id
    return f"{DEFAULT_KEY_PREFIX}{stream}:{seq}"


class ConsumerLink(JetStreamLink, Protocol):
    """The connection, and the creds in use now (their seed keys the completed-key record)."""

    @property
    def creds(self) -> Creds | None: ...


@dataclass(frozen=True)
class ConsumerContext:
    """What every event consumer of one sidecar shares, fixed at start."""

    link: ConsumerLink
    pool: AppPool
    metrics: Metrics
    #: This sidecar as a destination (``<service>.<namespace>``), for logs.
    source: str
    #: ``host:port`` of the app, its requests' Host header.
    app_host: str
    #: Whether ``exactlyOnce`` subscriptions keep the completed-key record.
    dedup: bool = True
    tracer: Tracer | None = None
    access_log: bool = True


def completed_keys(link: ConsumerLink, metrics: Metrics, d: Delivery) -> CompletedKeys:
    """The completed-key record of subscription ``d``, in the sidecar's own account."""
    source_namespace = d.source.rpartition(".")[2]
    unavailable = metrics.events_dedup_unavailable
    sealed: dict[str, bytes] = {}

    def secret() -> bytes | None:
        # The creds in use now: a renewal may change the seed.
        creds = link.creds
        if creds is None:
            return None
        if creds.seed not in sealed:
            sealed.clear()
            sealed[creds.seed] = seal_key(creds.seed)
        return sealed[creds.seed]

    return CompletedKeys(
        subjects.done_scope(source_namespace, d.consumer),
        connection=lambda: link.nc,
        jetstream=link.js,
        secret=secret,
        unavailable=lambda op: unavailable.labels(d.topic, op).inc(),
    )


class EventConsumer:
    """Pulls one durable consumer and delivers to the app's path."""

    def __init__(self, ctx: ConsumerContext, delivery: Delivery, batch: int = 16) -> None:
        self.ctx = ctx
        self.link = ctx.link
        self.pool = ctx.pool
        self.metrics = metrics = ctx.metrics
        self.d = delivery
        self.batch = batch
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.inflight = 0
        #: Exposed from the start (0), so a dashboard sees the subscription before an event.
        self.pending = metrics.events_pending.labels(delivery.source, delivery.topic)
        # 0 until one is dead-lettered
        metrics.events_dead.labels(delivery.source, delivery.topic)
        #: Only exactlyOnce pays for the completed-key record.
        self.done: CompletedKeys | None = None
        if delivery.mode == "exactlyOnce" and ctx.dedup:
            self.done = completed_keys(ctx.link, metrics, delivery)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def close(self, grace: float) -> None:
        """Stop fetching; let deliveries in hand finish within ``grace``."""
        self.stop.set()
        if self.task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.task), grace)
        except TimeoutError:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    async def _run(self) -> None:
        d = self.d
        while not self.stop.is_set():
            try:
                # Consumers of another namespace's stream are reached through
                # the imported JetStream API prefix the operator wired.
                js = self.link.js(d.api_prefix)
                psub = await js.pull_subscribe_bind(durable=d.consumer, stream=d.stream)
                logger.info("bound to consumer %s/%s for topic %s", d.stream, d.consumer, d.topic)
                try:
                    while not self.stop.is_set():
                        if self.done is not None and self.done.unwritten:
                            await self.done.flush()
                        try:
                            msgs = await psub.fetch(batch=self.batch, timeout=1.0)
                        except nats_errors.TimeoutError:
                            continue
                        await asyncio.gather(*(self.deliver(m) for m in msgs))
                finally:
                    with contextlib.suppress(Exception):
                        await psub.unsubscribe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.stop.is_set():
                    break
                logger.warning("consumer %s/%s: %s; retrying", d.stream, d.consumer, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 1.0)

    async def deliver(self, msg: Msg) -> str:
        """Deliver one message; returns ``delivered``, ``retry``, ``dead``, ``dropped``,
        ``duplicate`` (exactlyOnce: its key was completed before; acked, not
        handed to the app), ``ack_lost`` (the app answered, the ack did not
        reach the server: it redelivers) or ``error`` (nothing reached the app)."""
        d = self.d
        ctx = self.ctx
        t0 = time.perf_counter()
        self.inflight += 1
        try:
            meta: Any = msg.metadata
            num = int(meta.num_delivered)
            seq = int(meta.sequence.stream)
            # The ack subject says how many are left behind this one: the
            # consumer's lag, free of a consumer-info request.
            self.pending.set(int(meta.num_pending))
        except Exception:
            num, seq = 1, 0
        hdrs = msg.headers or {}
        rid = hdrs.get(codec.REQUEST_ID) or codec.new_request_id()
        key = idempotency_key(hdrs.get("Nats-Msg-Id"), d.stream, seq)
        status = 0
        answered = False
        done = self.done
        tracer = ctx.tracer
        #: With tracing, the app continues under this delivery's span.
        own = None if tracer is None else tracer.next_traceparent(hdrs.get(codec.TRACEPARENT))
        try:
            if done is not None and await done.lookup(key) == HIT:
                # Completed before and its ack was lost: the double ack the
                # first delivery could not make, and nothing for the app.
                await msg.ack_sync()
                result = "duplicate"
            else:
                if d.mode == "atMostOnce":
                    await msg.ack()
                status, err = await self._post(msg, hdrs, rid, num, seq, key, own)
                answered = True
                result = await self._settle(msg, hdrs, status, err, num, seq, key)
        except Exception as exc:
            # Ack/nak lost (e.g. NATS went away): the server redelivers after
            # ackWait. What the app answered stays on record: a 200 whose ack
            # was lost is the app's success, and its redelivery carries the
            # same Idempotency-Key (found in the completed-key record when
            # exactlyOnce wrote it).
            logger.warning("event %s seq %d: %s", d.topic, seq, exc)
            result = "ack_lost" if answered else "error"
        finally:
            self.inflight -= 1
        self.metrics.events_delivered.labels(d.topic, result).inc()
        if result == "dead":
            self.metrics.events_dead.labels(d.source, d.topic).inc()
        elapsed = time.perf_counter() - t0
        if ctx.access_log:
            accesslog.log(
                request_id=rid,
                direction="event",
                source=d.source,
                destination=ctx.source,
                route=d.topic,
                method="POST",
                path=d.path,
                status=status,
                duration_s=elapsed,
                attempts=num,
                error="" if result == "delivered" else result,
            )
        if tracer is not None and own is not None:
            tracer.delivery(
                own,
                hdrs.get(codec.TRACEPARENT),
                elapsed,
                topic=d.topic,
                publisher=d.source,
                path=d.path,
                seq=seq,
                attempt=num,
                status=status,
                result=result,
                request_id=rid,
            )
        return result

    async def _settle(
        self, msg: Msg, hdrs: dict[str, str], status: int, err: str, num: int, seq: int, key: str
    ) -> str:
        """Ack, nak or dead-letter after the app answered ``status``."""
        d = self.d
        ok = 200 <= status < 300
        if d.mode == "atMostOnce":
            return "delivered" if ok else "dropped"
        if ok:
            if d.mode == "exactlyOnce":
                if self.done is not None:
                    # After the 2xx, before the ack: a redelivery of an event
                    # whose ack is lost finds it there (never raises).
                    await self.done.record(key)
                await msg.ack_sync()
            else:
                await msg.ack()
            return "delivered"
        if num >= d.max_deliver:
            await self._dead_letter(msg, hdrs, status, err, num, seq)
            await msg.term()
            return "dead"
        delay = None
        if d.backoff_ms:
            delay = d.backoff_ms[min(num - 1, len(d.backoff_ms) - 1)] / 1000.0
        await msg.nak(delay=delay)
        return "retry"

    async def _post(
        self,
        msg: Msg,
        hdrs: dict[str, str],
        rid: str,
        num: int,
        seq: int,
        key: str,
        traceparent: str | None = None,
    ) -> tuple[int, str]:
        """POST the event to the app; ``traceparent`` (tracing on) replaces the message's."""
        d = self.d
        # The message is the publisher's word, and a raw publisher can write
        # anything: what the sidecar vouches for (source, topic, sequence,
        # key) is set here only, after dropping every copy the message carried.
        headers = [(k, v) for k, v in codec.nats_to_http(hdrs) if not _sidecar_owned(k)]
        if traceparent is not None:
            headers = [(k, v) for k, v in headers if k.lower() != codec.TRACEPARENT]
            headers.append((codec.TRACEPARENT, traceparent))
        headers += [
            ("Nm-Event-Topic", d.topic),
            ("Nm-Event-Source", d.source),
            ("Nm-Event-Seq", str(seq)),
            ("Nm-Event-Delivery", str(num)),
            ("Idempotency-Key", key),
        ]
        if codec.REQUEST_ID not in hdrs:
            headers.append((codec.REQUEST_ID, rid))
        data = codec.render_request("POST", d.path, headers, msg.data, self.ctx.app_host)
        if data is None:
            return 400, "bad_path"
        try:
            resp = await self.pool.request(
                data, head=False, limit_s=max(0.1, d.ack_wait_ms / 1000.0 * 0.9), retry_stale=True
            )
        except TimeoutError:
            return 504, "app_timeout"
        except AppError as exc:
            return 502, str(exc)
        return resp.status, ""

    async def _dead_letter(
        self, msg: Msg, hdrs: dict[str, str], status: int, err: str, num: int, seq: int
    ) -> None:
        d = self.d
        headers = {k: v for k, v in hdrs.items() if not k.startswith("Nats-")}
        headers.update(
            {
                "Nm-Dead-Topic": d.topic,
                "Nm-Dead-Stream": d.stream,
                "Nm-Dead-Seq": str(seq),
                "Nm-Dead-Deliveries": str(num),
                "Nm-Dead-Status": str(status),
                "Nm-Dead-Reason": err or f"app answered {status}",
                # A crash between this publish and the term must not store it twice.
                "Nats-Msg-Id": f"dlq-{d.stream}-{seq}",
            }
        )
        try:
            # Like an event: a dead-letter stream electing its leader is waited out.
            await publish_to_stream(self.link, d.dead_letter_subject, msg.data, None, headers)
        except (js_errors.NoStreamResponseError, nats_errors.NoRespondersError):
            # Still no stream keeps dead letters: still tell whoever listens.
            nc = self.link.nc
            if nc is not None:
                await nc.publish(d.dead_letter_subject, msg.data, headers=headers)
        logger.warning(
            "event %s seq %d dead-lettered to %s after %d deliveries",
            d.topic,
            seq,
            d.dead_letter_subject,
            num,
        )
