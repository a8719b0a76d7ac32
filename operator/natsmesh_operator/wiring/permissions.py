"""Least-privilege NATS permissions of one service's user.

Everything a sidecar may do is listed exactly here, so the sidecar can decode
its own JWT and answer 403 itself for anything not in ``pub.allow`` (a
forbidden publish is not an error on the request in NATS, only an async
permissions violation and a timeout).

publish:
  * ``mesh.*.*.*.<ns>.<self>``: one wildcard whatever the mesh's size. The
    caller's identity is the subject's tail; whether a call arrives is decided
    by the callee's subscriptions (below), so a grant that changes touches
    the callee's JWT only, never its callers'
  * replies: ``_INBOX.mesh.*.>`` when it admits its own namespace, else
    ``_INBOX.mesh.<caller>.>`` per admitted caller of its namespace, and
    ``_R_.>`` when it admits a caller of another namespace (those replies are
    server-made subjects of a service import, which clients cannot choose)
  * ``events.<ns>.<self>.<topic>`` of each topic it publishes
  * for each of its subscriptions: ``<api>.CONSUMER.MSG.NEXT|INFO.<stream>.<consumer>``
    and ``$JS.ACK.<stream>.<consumer>.>``, plus its dead-letter subject
  * for each exactlyOnce subscription, its completed keys:
    ``$KV.natsmesh-done.<source-ns>.<consumer>.*`` (put) and
    ``$JS.API.DIRECT.GET.KV_natsmesh-done.$KV.natsmesh-done.<source-ns>.<consumer>.*``
    (read one key): never another subscription's, nor a listing of the bucket
  * its own tap records: ``natsmesh.tap.<ns>.<self>.rec.*`` (sent only while
    its namespace's tap user asks for them)
  * its own route-table key and its namespace's target keys:
    ``$JS.API.DIRECT.GET.KV_natsmesh-routes.$KV.natsmesh-routes.<self>`` and
    ``…$KV.natsmesh-routes.to.*`` (a target is every caller's to read)
subscribe:
  * ``mesh.<ns>.<self>.<version>.<ns>.*`` when it admits its own namespace, and
    ``mesh.<ns>.<self>.<version>.<caller-ns>.<caller>`` per other admitted
    caller, each with queue group ``<self>`` only
  * ``mesh._<ns>.<self>.*.<ns>.*`` when it admits its own namespace, and
    ``mesh._<ns>.<self>.*.<caller-ns>.<caller>`` per other admitted caller,
    without a queue group: the call subjects of streamed bodies
    (natsmesh_sidecar.transport.stream), which the instance that took a call
    subscribes to for that call alone. The callers' side needs nothing new:
    their request permission already ends in their identity, and the
    callee answers into their inboxes (across namespaces: the ``_R_`` reply
    of the call subjects' service import, see natsmesh_operator.wiring.plan)
  * ``_INBOX.mesh.<self>.>`` (its own inbox prefix), ``$KV.natsmesh-routes.<self>``
    and ``$KV.natsmesh-routes.to.*``
  * the micro-service discovery subjects for its own name
  * its own tap control subject ``natsmesh.tap.<ns>.<self>.ctl`` (no queue
    group: every replica reports)
no response permission (``resp``): with it, whoever receives a message may
publish once to whatever reply subject the *sender* chose, and a service that
can send itself a request could publish anywhere in its account. Nor any
consumer creation: a push consumer's deliver subject is another subject the
server publishes to on the creator's behalf.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from natsmesh_sidecar import subjects
from natsmesh_sidecar.policy.permissions import allow_list

log = logging.getLogger(__name__)

JS_ACK_PREFIX = "$JS.ACK"


@dataclass(frozen=True)
class Permissions:
    pub_allow: tuple[str, ...]
    sub_allow: tuple[str, ...]

    def to_claims(self) -> dict[str, object]:
        """The ``pub``/``sub`` part of a user JWT's ``nats`` claims."""
        return {
            "pub": {"allow": list(self.pub_allow)},
            "sub": {"allow": list(self.sub_allow)},
        }

    def narrows(self, previous: Permissions) -> bool:
        """Whether anything ``previous`` allowed is no longer allowed."""
        return not (
            set(previous.pub_allow) <= set(self.pub_allow)
            and set(previous.sub_allow) <= set(self.sub_allow)
        )

    @classmethod
    def from_claims(cls, nats: object) -> Permissions:
        """The lists of a decoded JWT's ``nats`` claims (empty when absent)."""
        return cls(pub_allow=allow_list(nats, "pub"), sub_allow=allow_list(nats, "sub"))


@dataclass(frozen=True)
class ConsumerAccess:
    """What a subscriber needs to bind one durable consumer."""

    api_prefix: str
    stream: str
    consumer: str
    dead_letter_subject: str
    acks: bool
    source_namespace: str = ""
    exactly_once: bool = False


def consumer_api_subjects(api_prefix: str, stream: str, consumer: str) -> tuple[str, str]:
    return (
        f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"{api_prefix}.CONSUMER.INFO.{stream}.{consumer}",
    )


def ack_subject(stream: str, consumer: str) -> str:
    return f"{JS_ACK_PREFIX}.{stream}.{consumer}.>"


def completed_keys_pub(source_namespace: str, consumer: str) -> tuple[str, str]:
    """Write and direct-get its own subscription's completed keys, and no others'."""
    scope = subjects.done_scope(source_namespace, consumer)
    return (subjects.done_key_subject(scope), subjects.done_direct_get(scope))


def routes_kv_pub(service: str) -> tuple[str, ...]:
    # Only a direct get of its own key: the watch is a plain subscription on
    # the key's subject (see natsmesh_sidecar.policy.table.KvWatch).
    stream = subjects.routes_stream()
    key = subjects.routes_key_subject(service)
    return (
        f"{subjects.JS_API_PREFIX}.DIRECT.GET.{stream}.{key}",
        # the policies of its namespace's services, read on first call
        f"{subjects.JS_API_PREFIX}.DIRECT.GET.{stream}.{subjects.target_key_subject('*')}",
    )


def micro_pub() -> tuple[str, ...]:
    """Where discovery answers go: the operator's (and `nats micro --inbox-prefix
    _INBOX.natsmesh`) inboxes, never a reply subject a tenant chose."""
    return (f"{subjects.OPERATOR_INBOX_ROOT}.>",)


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
    admits_namespace: bool,
    admitted: Iterable[tuple[str, str]],
    publish_topics: Iterable[str],
    consumers: Iterable[ConsumerAccess],
) -> Permissions:
    """The permissions of one service's user; see the module docstring.

    ``admits_namespace``: every service of ``namespace`` may call it;
    ``admitted``: further ``(namespace, service)`` callers it admits.
    """
    group = subjects.queue_group(service)
    callers = sorted(
        {(ns, svc) for ns, svc in admitted if not (admits_namespace and ns == namespace)}
    )
    serve: list[str] = []
    replies: list[str] = []
    streams: list[str] = []
    if admits_namespace:
        serve.append(subjects.serve_subject(namespace, service, version, namespace, "*"))
        replies.append(f"{subjects.INBOX_ROOT}.*.>")
        streams.append(subjects.stream_serve_subject(namespace, service, namespace, "*"))
    for ns, svc in callers:
        serve.append(subjects.serve_subject(namespace, service, version, ns, svc))
        if ns == namespace:
            replies.append(f"{subjects.inbox_prefix(svc)}.>")
        streams.append(subjects.stream_serve_subject(namespace, service, ns, svc))
    if any(ns != namespace for ns, _ in callers):
        replies.append(f"{subjects.SERVICE_REPLY_PREFIX}>")
    pub: list[str] = [subjects.caller_publish(namespace, service), *replies]
    pub += [subjects.event_subject(namespace, service, t) for t in sorted(set(publish_topics))]
    for c in sorted(consumers, key=lambda c: (c.stream, c.consumer)):
        pub += consumer_api_subjects(c.api_prefix, c.stream, c.consumer)
        if c.acks:
            pub.append(ack_subject(c.stream, c.consumer))
            pub.append(c.dead_letter_subject)
        if c.exactly_once:
            pub += completed_keys_pub(c.source_namespace, c.consumer)
    pub.append(subjects.tap_records(namespace, service))
    pub += routes_kv_pub(service)
    pub += micro_pub()
    sub = [
        *(f"{s} {group}" for s in serve),
        *streams,
        f"{subjects.inbox_prefix(service)}.>",
        subjects.routes_key_subject(service),
        subjects.target_key_subject("*"),
        *micro_sub(service),
        subjects.tap_control(namespace, service),
    ]
    return Permissions(pub_allow=tuple(dict.fromkeys(pub)), sub_allow=tuple(sub))


def tap_permissions(namespace: str) -> Permissions:
    """The namespace's tap user (``natsmesh tap``): start, renew and stop taps of
    the namespace's services and read their records; nothing else (no call, no
    event, no inbox, no JetStream). Fixed size, whatever the namespace holds."""
    return Permissions(
        pub_allow=(subjects.tap_control(namespace, "*"),),
        sub_allow=(subjects.tap_records(namespace, "*"),),
    )


def may_publish(permissions: Permissions, subject: str) -> bool:
    """Whether the allow list admits ``subject`` (what the sidecar checks for 403)."""
    return any(subjects.subject_matches(p.split(" ")[0], subject) for p in permissions.pub_allow)
