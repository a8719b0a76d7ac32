"""Events: ``POST /_events/<topic>`` -> JetStream.

Publishing answers 202 only after the stream acknowledged the message, so an
accepted event survives a server restart; ``Idempotency-Key`` becomes
``Nats-Msg-Id`` and the stream's duplicate window stores a repeat once.
Delivering subscriptions to the app is natsmesh_sidecar.events.consumer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any, Protocol

from nats import errors as nats_errors
from nats.js import errors as js_errors

from natsmesh_sidecar import codec, subjects

if TYPE_CHECKING:
    from natsmesh_sidecar.edge.request import Request
    from natsmesh_sidecar.observe.metrics import Metrics
    from natsmesh_sidecar.observe.tracing import Tracer
    from natsmesh_sidecar.policy.permissions import Permissions
    from natsmesh_sidecar.policy.table import Router

logger = logging.getLogger(__name__)

#: Seconds a publish may take in all, resends included (then 504).
PUBLISH_TIMEOUT = 5.0
#: Seconds one attempt waits for the stream's ack before the same message is
#: sent again. A server restarting can lose a publish or its ack; the resend
#: carries the same ``Nats-Msg-Id``, so the stream's duplicate window stores
#: the message once whichever attempt got through.
ACK_RESEND_SECONDS = 1.5
#: Seconds a publish answered "no responders" is retried: the stream has no
#: leader for a moment while one is elected (a NATS server restarting). Such
#: a message reached no stream, so sending it again stores it once.
NO_LEADER_RETRY_SECONDS = 3.0
NO_LEADER_RETRY_WAIT = 0.1
_JSON = [("content-type", "application/json")]
#: Idempotency keys the consumer makes up for messages without one
#: (``nm:<stream>:<seq>``). A message's own ``Nats-Msg-Id`` with this prefix
#: is forged -- a raw publisher aiming at another message's key -- and is
#: ignored; the publishing sidecar refuses such keys from its app.
DEFAULT_KEY_PREFIX = "nm:"
#: ``Nats-Msg-Id`` of an event published without an ``Idempotency-Key``: one
#: random id per publish, so its resends are stored once. Under the reserved
#: prefix, so the subscriber still sees ``nm:<stream>:<seq>`` as its key.
PUBLISHED_KEY_PREFIX = DEFAULT_KEY_PREFIX + "pub:"


class JetStreamLink(Protocol):
    """The current NATS connection and JetStream contexts on it: both change
    with a reconnect elsewhere or a creds renewal, so they are asked each time."""

    @property
    def nc(self) -> Any: ...
    def js(self, prefix: str = subjects.JS_API_PREFIX) -> Any: ...


class PublishLink(JetStreamLink, Protocol):
    """What a publish reads as it is at that moment: the route table's topics,
    our publish permissions, the connection's message limit."""

    @property
    def router(self) -> Router: ...
    @property
    def permissions(self) -> Permissions: ...
    def max_body(self) -> int: ...


class EventPublisher:
    """``POST /_events/<topic>`` from the app, answered once the stream stored it."""

    def __init__(
        self,
        link: PublishLink,
        *,
        source: str,
        metrics: Metrics,
        tracer: Tracer | None = None,
    ) -> None:
        self.link = link
        self.source = source
        self.metrics = metrics
        #: Set only with an OTLP endpoint (natsmesh_sidecar.observe.tracing).
        self.tracer = tracer

    async def publish_http(
        self, req: Request, rid: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        link, source = self.link, self.source
        if req.method != "POST":
            return (
                405,
                [*_JSON, ("allow", "POST")],
                codec.error_body("method_not_allowed", "events are published with POST", rid),
            )
        topic = req.path[len("/_events/") :]
        if not subjects.is_topic(topic):
            return (
                400,
                list(_JSON),
                codec.error_body("bad_request", f"invalid topic {topic!r}", rid),
            )
        pub = link.router.table.publishes.get(topic)
        if pub is None:
            return (
                404,
                list(_JSON),
                codec.error_body("unknown_topic", f"{source} does not publish topic {topic}", rid),
            )
        if not link.permissions.can_publish(pub.subject):
            return (
                403,
                list(_JSON),
                codec.error_body(
                    "forbidden", f"{source} is not permitted to publish to {pub.subject}", rid
                ),
            )
        if len(req.body) > link.max_body():
            return (
                413,
                list(_JSON),
                codec.error_body("payload_too_large", "event exceeds max_payload", rid),
            )
        nc = link.nc
        if nc is None or not nc.is_connected:
            return (
                503,
                [*_JSON, ("retry-after", "1")],
                codec.error_body("nats_unavailable", "NATS connection is down; retry shortly", rid),
            )
        incoming = req.special.get("traceparent")
        tracer = self.tracer
        tp = req.traceparent = (
            codec.next_traceparent(incoming)
            if tracer is None
            else tracer.next_traceparent(incoming)
        )
        headers = {codec.REQUEST_ID: rid, codec.TRACEPARENT: tp, codec.H_SOURCE: source}
        ctype = req.special.get("content-type")
        if ctype:
            headers["Content-Type"] = ctype
        key = req.special.get("idempotency-key")
        if key:
            if key.startswith(DEFAULT_KEY_PREFIX):
                return (
                    400,
                    list(_JSON),
                    codec.error_body(
                        "bad_request",
                        f"Idempotency-Key may not start with {DEFAULT_KEY_PREFIX!r}: "
                        "the mesh reserves those for events without a key",
                        rid,
                    ),
                )
            headers["Nats-Msg-Id"] = key
        else:
            headers["Nats-Msg-Id"] = PUBLISHED_KEY_PREFIX + uuid.uuid4().hex
        try:
            ack = await publish_to_stream(link, pub.subject, req.body, pub.stream, headers)
        except (js_errors.NoStreamResponseError, nats_errors.NoRespondersError):
            return (
                503,
                [*_JSON, ("retry-after", "1")],
                codec.error_body("no_stream", f"no stream accepts {pub.subject}", rid),
            )
        except nats_errors.TimeoutError:
            return (
                504,
                list(_JSON),
                codec.error_body("timeout", "the stream did not acknowledge in time", rid),
            )
        except js_errors.APIError as exc:
            return 502, list(_JSON), codec.error_body("stream_error", str(exc), rid)
        except (
            nats_errors.ConnectionClosedError,
            nats_errors.ConnectionReconnectingError,
            nats_errors.ConnectionDrainingError,
            nats_errors.OutboundBufferLimitError,
        ):
            return (
                503,
                [*_JSON, ("retry-after", "1")],
                codec.error_body("nats_unavailable", "NATS connection is down; retry shortly", rid),
            )
        self.metrics.events_published.labels(topic).inc()
        # Without the app's key, a duplicate can only be our own resend.
        duplicate = bool(ack.duplicate) and bool(key)
        body = json.dumps({"stream": ack.stream, "seq": ack.seq, "duplicate": duplicate}).encode()
        return 202, list(_JSON), body


async def publish_to_stream(
    link: JetStreamLink, subject: str, body: bytes, stream: str | None, headers: dict[str, str]
) -> Any:
    """Publish to the stream (``None``: whichever keeps ``subject``), within
    PUBLISH_TIMEOUT in all: again while it has no leader (see
    NO_LEADER_RETRY_SECONDS) and, when ``headers`` carry a ``Nats-Msg-Id``,
    again when an ack is late (see ACK_RESEND_SECONDS)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    no_leader_until = start + NO_LEADER_RETRY_SECONDS
    deadline = start + PUBLISH_TIMEOUT
    # Without an id a resend could store the message twice: wait it out once.
    per_try = ACK_RESEND_SECONDS if "Nats-Msg-Id" in headers else PUBLISH_TIMEOUT
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise nats_errors.TimeoutError
        try:
            # link.js() each time: the connection may have moved meanwhile.
            return await link.js().publish(
                subject, body, timeout=min(per_try, left), stream=stream, headers=headers
            )
        except (js_errors.NoStreamResponseError, nats_errors.NoRespondersError):
            now = loop.time()
            if now + NO_LEADER_RETRY_WAIT > min(no_leader_until, deadline):
                raise
            await asyncio.sleep(NO_LEADER_RETRY_WAIT)
        except nats_errors.TimeoutError:
            if per_try >= PUBLISH_TIMEOUT:
                raise
            logger.debug("no ack for %s within %.1fs: sending it again", subject, per_try)
