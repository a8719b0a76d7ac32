"""Least-privilege NATS permissions of one service's user.

Everything a sidecar may do is listed exactly here, so the sidecar can decode
its own JWT and answer 403 itself for anything not in ``pub.allow`` (a
forbidden publish is not an error on the request in NATS, only an async
permissions violation and a timeout).

publish:
  * ``mesh.<ns>.<svc>.*`` of every service that admits it as a caller
  * ``events.<ns>.<self>.<topic>`` of each topic it publishes
  * for each of its subscriptions: ``<api>.CONSUMER.MSG.NEXT|INFO.<stream>.<consumer>``
    and ``$JS.ACK.<stream>.<consumer>.>``, plus its dead-letter subject
  * its own route-table key: ``$JS.API.STREAM.INFO.KV_natsmesh-routes``,
    ``$JS.API.DIRECT.GET.KV_natsmesh-routes.$KV.natsmesh-routes.<self>`` and a
    filtered ``$JS.API.CONSUMER.CREATE.KV_natsmesh-routes.*.$KV.natsmesh-routes.<self>``
subscribe:
  * ``mesh.<ns>.<self>.<version>`` with queue group ``<self>`` only
  * ``_INBOX.<self>.>`` (its own inbox prefix) and ``$KV.natsmesh-routes.<self>``
  * the micro-service discovery subjects for its own name
responses: allowed (one reply per request received, the default TTL).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from natsmesh_sidecar import subjects

log = logging.getLogger(__name__)

JS_ACK_PREFIX = "$JS.ACK"


@dataclass(frozen=True)
class Permissions:
    pub_allow: tuple[str, ...]
    sub_allow: tuple[str, ...]
    allow_responses: bool = True

    def to_claims(self) -> dict[str, object]:
        """The ``pub``/``sub``/``resp`` part of a user JWT's ``nats`` claims."""
        out: dict[str, object] = {
            "pub": {"allow": list(self.pub_allow)},
            "sub": {"allow": list(self.sub_allow)},
        }
        if self.allow_responses:
            # max 1: one reply per request received; ttl 0 = server default.
            out["resp"] = {"max": 1, "ttl": 0}
        return out


@dataclass(frozen=True)
class ConsumerAccess:
    """What a subscriber needs to bind one durable consumer."""

    api_prefix: str
    stream: str
    consumer: str
    dead_letter_subject: str
    acks: bool


def consumer_api_subjects(api_prefix: str, stream: str, consumer: str) -> tuple[str, str]:
    return (
        f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"{api_prefix}.CONSUMER.INFO.{stream}.{consumer}",
    )


def ack_subject(stream: str, consumer: str) -> str:
    return f"{JS_ACK_PREFIX}.{stream}.{consumer}.>"


def routes_kv_pub(service: str) -> tuple[str, ...]:
    stream = subjects.routes_stream()
    key = subjects.routes_key_subject(service)
    return (
        f"{subjects.JS_API_PREFIX}.STREAM.INFO.{stream}",
        f"{subjects.JS_API_PREFIX}.DIRECT.GET.{stream}.{key}",
        # The filter is part of the subject, so the server refuses a watch on
        # any other key; the unfiltered CONSUMER.CREATE.<stream> is not allowed.
        f"{subjects.JS_API_PREFIX}.CONSUMER.CREATE.{stream}.*.{key}",
    )


def micro_sub(service: str) -> tuple[str, ...]:
    return (
        "$SRV.PING",
        "$SRV.INFO",
        "$SRV.STATS",
        f"$SRV.*.{service}",
        f"$SRV.*.{service}.*",
    )


def service_permissions(
    *,
    namespace: str,
    service: str,
    version: str,
    callable_targets: Iterable[tuple[str, str]],
    publish_topics: Iterable[str],
    consumers: Iterable[ConsumerAccess],
) -> Permissions:
    """The permissions of one service's user; see the module docstring."""
    pub: list[str] = [
        subjects.request_wildcard(ns, svc) for ns, svc in sorted(set(callable_targets))
    ]
    pub += [subjects.event_subject(namespace, service, t) for t in sorted(set(publish_topics))]
    for c in sorted(consumers, key=lambda c: (c.stream, c.consumer)):
        pub += consumer_api_subjects(c.api_prefix, c.stream, c.consumer)
        if c.acks:
            pub.append(ack_subject(c.stream, c.consumer))
            pub.append(c.dead_letter_subject)
    pub += routes_kv_pub(service)
    sub = [
        f"{subjects.request_subject(namespace, service, version)} {subjects.queue_group(service)}",
        f"{subjects.inbox_prefix(service)}.>",
        subjects.routes_key_subject(service),
        *micro_sub(service),
    ]
    return Permissions(pub_allow=tuple(dict.fromkeys(pub)), sub_allow=tuple(sub))


def may_publish(permissions: Permissions, subject: str) -> bool:
    """Whether the allow list admits ``subject`` (what the sidecar checks for 403)."""
    return any(subjects.subject_matches(p.split(" ")[0], subject) for p in permissions.pub_allow)
