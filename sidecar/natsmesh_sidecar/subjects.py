"""NATS subject and name scheme shared by the operator and the sidecar.

Requests:  ``mesh.<namespace>.<service>.<version>.<caller-ns>.<caller>`` (queue
           group ``<service>``): the caller's identity is part of the subject, so
           a caller publishes to one wildcard ending in its own name and a callee
           subscribes only to the callers it admits (permissions that do not grow
           with the namespace). Route tables carry the first four tokens (the
           *base* subject); each sidecar appends its own identity.
Streams of one call (a body larger than one message, natsmesh_sidecar.transport.stream):
           ``mesh._<namespace>.<service>.<call>.<caller-ns>.<caller>`` carries the
           caller's chunks and credits to the one callee instance that took the
           call; the caller's own request permission covers it (its identity is
           still last), only the callee may subscribe (no queue group), and the
           ``_`` keeps it apart from every service subject; across namespaces
           the callee's account exports it per admitted caller (response type
           Stream) and the caller's imports it
Events:    ``events.<namespace>.<service>.<topic>``
Streams:   ``EVENTS_<service>`` in the namespace's account (one per publisher)
Route KV:  bucket ``natsmesh-routes`` in the namespace's account, key ``<service>``
Inboxes:   ``_INBOX.mesh.<service>.>`` (connect with ``inbox_prefix``; other
           users of the account cannot read a service's replies, and a callee may
           answer only into the inboxes of callers it admits)
Dead letters: ``deadletter.<namespace>.<service>.<consumer>`` into stream
           ``DLQ_<service>`` in the subscriber's account
Tap:       ``natsmesh.tap.<namespace>.<service>.ctl`` (a tap starts, renews or
           stops; every sidecar of the service listens, no queue group) and
           ``natsmesh.tap.<namespace>.<service>.rec.<session>`` (its records);
           only the namespace's tap user may publish the one and read the other

Kubernetes names are DNS labels (``[a-z0-9-]``), so they are always safe as
single subject tokens; topics are validated against :data:`TOPIC_PATTERN`.
"""

from __future__ import annotations

import re

REQUEST_PREFIX = "mesh"
EVENT_PREFIX = "events"
DEAD_LETTER_PREFIX = "deadletter"
INBOX_ROOT = "_INBOX.mesh"
#: Replies to requests that crossed a service import (another namespace's
#: account) arrive on these; clients cannot choose them as reply subjects.
SERVICE_REPLY_PREFIX = "_R_."
#: The operator's inboxes (its $SRV.PING): the only foreign inboxes a sidecar
#: may publish to, for its discovery answers.
OPERATOR_INBOX_ROOT = "_INBOX.natsmesh"
#: The JetStream API prefix of the sidecar's own account.
JS_API_PREFIX = "$JS.API"
ROUTES_BUCKET = "natsmesh-routes"
#: Completed Idempotency-Keys of exactlyOnce subscriptions, one bucket per
#: namespace account (see natsmesh_sidecar.events.completed).
DONE_BUCKET = "natsmesh-done"
DEFAULT_VERSION = "v1"

#: A DNS-1123 label: what Kubernetes allows for namespace and service names.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: Versions become a subject token, so no dots or wildcards.
VERSION_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: Topics are one or more dot-separated tokens of safe characters.
TOPIC_PATTERN = r"^[a-z0-9]([-_a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-_a-z0-9]*[a-z0-9])?)*$"

_name_re = re.compile(NAME_PATTERN)
_topic_re = re.compile(TOPIC_PATTERN)


def is_name(value: str) -> bool:
    return bool(_name_re.match(value)) and len(value) <= 63


def is_topic(value: str) -> bool:
    return bool(_topic_re.match(value)) and len(value) <= 200


def request_subject(namespace: str, service: str, version: str = DEFAULT_VERSION) -> str:
    return f"{REQUEST_PREFIX}.{namespace}.{service}.{version}"


def call_subject(base: str, caller_namespace: str, caller: str) -> str:
    """The subject ``caller`` publishes a request for ``base`` (a request subject) on."""
    return f"{base}.{caller_namespace}.{caller}"


def caller_suffix(caller_namespace: str, caller: str) -> str:
    return f".{caller_namespace}.{caller}"


def caller_publish(namespace: str, service: str) -> str:
    """A caller's one request permission: any target, its own identity last."""
    return f"{REQUEST_PREFIX}.*.*.*.{namespace}.{service}"


def serve_subject(namespace: str, service: str, version: str, caller_ns: str, caller: str) -> str:
    """What a callee subscribes to for one admitted caller (``*``: all of ``caller_ns``)."""
    return f"{REQUEST_PREFIX}.{namespace}.{service}.{version}.{caller_ns}.{caller}"


#: Marks the namespace token of a stream's call subject (no namespace starts with it).
STREAM_MARK = "_"


def stream_serve_subject(namespace: str, service: str, caller_ns: str, caller: str) -> str:
    """What a callee may subscribe to for the streamed calls of ``caller`` (``*``: all
    of ``caller_ns``): every call id, without a queue group. Across namespaces
    also what its account exports to the caller's."""
    return f"{REQUEST_PREFIX}.{STREAM_MARK}{namespace}.{service}.*.{caller_ns}.{caller}"


def import_subject(namespace: str, service: str, caller_ns: str, caller: str) -> str:
    """All versions of ``service`` as called by ``caller`` (``*``: any of ``caller_ns``):
    the service export/import that lets another namespace's callers reach it."""
    return f"{REQUEST_PREFIX}.{namespace}.{service}.*.{caller_ns}.{caller}"


def caller_of(subject: str) -> tuple[str, str] | None:
    """``(namespace, service)`` of the caller a request subject names, if it is one."""
    tokens = subject.split(".")
    if len(tokens) != 6 or tokens[0] != REQUEST_PREFIX:
        return None
    return tokens[4], tokens[5]


def serve_subjects(sub_allow: tuple[str, ...], request: str) -> list[tuple[str, str]]:
    """``(subject, queue)`` of the subscriptions for ``request`` among a JWT's ``sub.allow``."""
    out = []
    for entry in sub_allow:
        subject, _, queue = entry.partition(" ")
        if subject.startswith(request + "."):
            out.append((subject, queue))
    return out


def reply_admissible(
    own_namespace: str, caller_ns: str, caller: str, reply: str, *, accounts: bool = True
) -> bool:
    """Whether a request's reply subject is one its named caller could have set.

    A real caller always sets a reply: its own inbox in the same account, or a
    server-made ``_R_.`` subject when the request crossed a service import. A
    message the server itself publishes for a tenant (a JetStream ack, a pulled
    message, a direct get, sent to a reply subject that tenant chose) carries no
    reply or a ``$JS.ACK.`` one, so it can never pass as another caller's request.
    """
    inbox = reply.startswith(f"{INBOX_ROOT}.{caller}.")
    if caller_ns == own_namespace:
        return inbox
    # Without accounts (no creds: a dev server) nothing crosses an import.
    return reply.startswith(SERVICE_REPLY_PREFIX) or (inbox and not accounts)


def queue_group(service: str) -> str:
    return service


def event_subject(namespace: str, service: str, topic: str) -> str:
    return f"{EVENT_PREFIX}.{namespace}.{service}.{topic}"


def event_wildcard(namespace: str, service: str) -> str:
    return f"{EVENT_PREFIX}.{namespace}.{service}.>"


def stream_name(service: str) -> str:
    return f"EVENTS_{service}"


def consumer_name(
    subscriber: str,
    source_service: str,
    topic: str,
    subscriber_namespace: str | None = None,
) -> str:
    """Durable consumer of one subscription; '.' is not allowed in names.

    Consumers live next to the stream, in the publisher's account. A
    subscriber from another namespace gets its namespace as a prefix (``_``
    never occurs in a namespace) so two namespaces' same-named subscribers
    never share a consumer.
    """
    base = f"{subscriber}--{source_service}--{topic.replace('.', '_')}"
    return f"{subscriber_namespace}_{base}" if subscriber_namespace else base


def inbox_prefix(service: str) -> str:
    """The ``inbox_prefix`` a sidecar connects with; only it may read these replies."""
    return f"{INBOX_ROOT}.{service}"


def dead_letter_stream(service: str) -> str:
    return f"DLQ_{service}"


def dead_letter_subject(namespace: str, service: str, consumer: str) -> str:
    return f"{DEAD_LETTER_PREFIX}.{namespace}.{service}.{consumer}"


def dead_letter_wildcard(namespace: str, service: str) -> str:
    return f"{DEAD_LETTER_PREFIX}.{namespace}.{service}.>"


def imported_js_api_prefix(namespace: str) -> str:
    """JetStream API prefix for consumers imported from ``namespace``'s account.

    Not ``$JS.API``: that subject space is already the account's own
    JetStream, so an imported consumer API is mapped beside it.
    """
    return f"natsmesh.jsapi.{namespace}"


def routes_stream() -> str:
    return f"KV_{ROUTES_BUCKET}"


def routes_key_subject(service: str) -> str:
    """The subject a KV put of the service's table is published on."""
    return f"$KV.{ROUTES_BUCKET}.{routes_key(service)}"


def routes_key(service: str) -> str:
    return service


def done_stream() -> str:
    return f"KV_{DONE_BUCKET}"


def done_scope(source_namespace: str, consumer: str) -> str:
    """The key prefix of one subscription's completed keys.

    The consumer's name alone is not enough: two publishers of one name in
    two namespaces give one subscriber two consumers of the same name.
    """
    return f"{source_namespace}.{consumer}"


def done_key_subject(scope: str, entry: str = "*") -> str:
    """Where a completed key is put (``*``: all of one subscription's)."""
    return f"$KV.{DONE_BUCKET}.{scope}.{entry}"


def done_direct_get(scope: str, entry: str = "*") -> str:
    """The direct get of one completed key's last value."""
    return f"{JS_API_PREFIX}.DIRECT.GET.{done_stream()}.{done_key_subject(scope, entry)}"


TAP_PREFIX = "natsmesh.tap"


def tap_control(namespace: str, service: str) -> str:
    """Where a tap of ``service`` is started, renewed and stopped (``*``: any service)."""
    return f"{TAP_PREFIX}.{namespace}.{service}.ctl"


def tap_records(namespace: str, service: str, session: str = "*") -> str:
    """Where ``service``'s sidecars send one tap session's records (``*``: any session)."""
    return f"{TAP_PREFIX}.{namespace}.{service}.rec.{session}"


TARGET_KEY_PREFIX = "to."


def target_key(service: str) -> str:
    """The KV key of ``service``'s :class:`~natsmesh_sidecar.config.Target`."""
    return f"{TARGET_KEY_PREFIX}{service}"


def target_key_subject(service: str) -> str:
    return f"$KV.{ROUTES_BUCKET}.{target_key(service)}"


def host_of(namespace: str, service: str) -> str:
    """The Host a caller uses: ``service.namespace``."""
    return f"{service}.{namespace}"


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: ``*`` is one token, a trailing ``>`` one or more."""
    p_tokens = pattern.split(".")
    s_tokens = subject.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens):
            return False
        if p != "*" and p != s_tokens[i]:
            return False
    return len(p_tokens) == len(s_tokens)
