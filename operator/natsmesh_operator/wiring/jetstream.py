"""JetStream object specs as the server's own JSON, and how to compare them.

We speak the JetStream API JSON directly (not the client's typed configs):
durations are nanoseconds exactly as the server stores them, so "is the live
object what we want?" is a plain comparison of the fields we own and an
unchanged object is never updated. Fields the server adds (defaults, its own
``_nats.*`` metadata) are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from natsmesh_operator.wiring.plan import ConsumerPlan, StreamPlan
from natsmesh_sidecar import subjects

log = logging.getLogger(__name__)

MANAGED_KEY = "natsmesh.io/managed"
MANAGED_META = {MANAGED_KEY: "true"}
NS_PER_MS = 1_000_000

#: Changing these needs a new stream/consumer (data loss): reported, not done.
STREAM_IMMUTABLE = ("storage", "retention")
CONSUMER_IMMUTABLE = ("deliver_policy", "ack_policy")

ROUTES_HISTORY = 5

#: The shortest a completed key is kept (see :func:`done_window_ms`).
DONE_MIN_MS = 5 * 60 * 1000
#: ... and the longest: a day of keys is plenty of storage already.
DONE_MAX_MS = 24 * 60 * 60 * 1000


def stream_config(s: StreamPlan, nats_replicas: int = 1) -> dict[str, Any]:
    """``nats_replicas``: what the mesh's own streams are replicated to (see
    :attr:`StreamPlan.mesh_owned`); a NatsService's event stream has its own."""
    st = s.settings
    return {
        "name": s.name,
        "description": s.description,
        "subjects": list(s.subjects),
        "retention": st.retention,
        "storage": st.storage,
        "num_replicas": nats_replicas if s.mesh_owned else st.replicas,
        "max_age": st.max_age_ms * NS_PER_MS,
        "max_bytes": st.max_bytes,
        "max_msgs": st.max_msgs,
        "duplicate_window": min(st.duplicate_window_ms, st.max_age_ms or st.duplicate_window_ms)
        * NS_PER_MS,
        "discard": "old",
        "metadata": dict(MANAGED_META),
    }


def routes_stream_config(replicas: int = 1) -> dict[str, Any]:
    """The route KV bucket as a stream, shaped like the clients' KV buckets.

    ``replicas`` follows the NATS cluster: an R1 bucket on a three-server
    cluster is unreadable while its one server restarts (no sidecar could
    start then). Raising it on a live bucket is a plain stream update."""
    return {
        "name": subjects.routes_stream(),
        "description": "natsmesh: compiled route tables, one key per service",
        "subjects": [f"$KV.{subjects.ROUTES_BUCKET}.>"],
        "retention": "limits",
        "storage": "file",
        "num_replicas": replicas,
        "max_msgs_per_subject": ROUTES_HISTORY,
        "discard": "new",
        "allow_rollup_hdrs": True,
        "deny_delete": True,
        "allow_direct": True,
        "duplicate_window": 120 * 1_000_000_000,
        "max_age": 0,
        "metadata": dict(MANAGED_META),
    }


def done_window_ms(consumers: Iterable[ConsumerPlan]) -> int:
    """How long a completed key must be kept: until its event cannot come again.

    A delivery whose ack was lost comes again after ackWait (or its backoff
    step), up to maxDeliver times, so the last redelivery of an event is at
    most ``maxDeliver x (ackWait + the longest backoff)`` after the first;
    the longest of the namespace's exactlyOnce subscriptions, and never
    under five minutes, so a restart of nats-server or of a sidecar (which
    delays redelivery by the time it takes) stays inside it too.
    """
    longest = 0
    for c in consumers:
        step = c.ack_wait_ms + max(c.backoff_ms, default=0)
        longest = max(longest, c.max_deliver * step)
    return min(max(longest, DONE_MIN_MS), DONE_MAX_MS)


def done_stream_config(window_ms: int, replicas: int = 1) -> dict[str, Any]:
    """The completed-key bucket of exactlyOnce subscribers, as a KV stream.

    One value per key (a repeat put replaces it) and each expires
    ``window_ms`` after it was written; direct gets so a lookup is one
    request that needs no consumer.
    """
    return {
        "name": subjects.done_stream(),
        "description": "natsmesh: Idempotency-Keys exactlyOnce subscribers completed",
        "subjects": [f"$KV.{subjects.DONE_BUCKET}.>"],
        "retention": "limits",
        "storage": "file",
        "num_replicas": replicas,
        "max_msgs_per_subject": 1,
        "discard": "old",
        "allow_rollup_hdrs": True,
        "deny_delete": True,
        "allow_direct": True,
        "duplicate_window": min(120_000, window_ms) * NS_PER_MS,
        "max_age": window_ms * NS_PER_MS,
        "metadata": dict(MANAGED_META),
    }


def consumer_config(c: ConsumerPlan) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": c.name,
        "durable_name": c.name,
        "description": c.description,
        "filter_subject": c.filter_subject,
        "deliver_policy": c.deliver_policy,
        "ack_policy": "explicit" if c.ack_explicit else "none",
        "replay_policy": "instant",
        "metadata": dict(MANAGED_META),
    }
    if c.ack_explicit:
        # No server-side `backoff`: the server then uses its first step as the
        # ack wait of every delivery, so an app given `ackWait: 10s` with
        # `backoff: [500ms, ...]` got a redelivery while still handling the
        # first one after 500 ms (a duplicate under load, seen on kind). The
        # subscriber's sidecar applies the backoff itself, as the delay of the
        # nak after a failed delivery; a delivery nobody acks (the sidecar
        # died) comes back after ackWait.
        cfg["ack_wait"] = c.ack_wait_ms * NS_PER_MS
        cfg["max_deliver"] = c.max_deliver
    return cfg


def differences(wanted: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    """Names of the fields we own whose live value differs from the wanted one."""
    out = []
    for key, value in wanted.items():
        have = live.get(key)
        if key == "metadata":
            have_meta = have if isinstance(have, dict) else {}
            if any(have_meta.get(k) != v for k, v in value.items()):
                out.append(key)
        elif key == "subjects":
            if sorted(value) != sorted(have or []):
                out.append(key)
        elif key == "description":
            if (have or "") != value:
                out.append(key)
        elif key in {"backoff"}:
            if list(have or []) != list(value):
                out.append(key)
        elif have != value:
            out.append(key)
    if "backoff" not in wanted and live.get("backoff"):
        out.append("backoff")
    return out


def is_managed(config: Mapping[str, Any]) -> bool:
    meta = config.get("metadata")
    return isinstance(meta, dict) and meta.get(MANAGED_KEY) == "true"
