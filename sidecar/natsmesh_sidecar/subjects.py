"""NATS subject and name scheme shared by the operator and the sidecar.

Requests:  ``mesh.<namespace>.<service>.<version>`` (queue group ``<service>``)
Events:    ``events.<namespace>.<service>.<topic>``
Streams:   ``EVENTS_<service>`` in the namespace's account (one per publisher)
Route KV:  bucket ``natsmesh-routes`` in the namespace's account, key ``<service>``
Inboxes:   ``_INBOX.<service>.>`` (connect with ``inbox_prefix``; other users
           of the account cannot read a service's replies)
Dead letters: ``deadletter.<namespace>.<service>.<consumer>`` into stream
           ``DLQ_<service>`` in the subscriber's account

Kubernetes names are DNS labels (``[a-z0-9-]``), so they are always safe as
single subject tokens; topics are validated against :data:`TOPIC_PATTERN`.
"""

from __future__ import annotations

import re

REQUEST_PREFIX = "mesh"
EVENT_PREFIX = "events"
DEAD_LETTER_PREFIX = "deadletter"
INBOX_ROOT = "_INBOX"
#: The JetStream API prefix of the sidecar's own account.
JS_API_PREFIX = "$JS.API"
ROUTES_BUCKET = "natsmesh-routes"
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


def request_wildcard(namespace: str, service: str) -> str:
    """All versions of one service: what a caller is permitted to publish to."""
    return f"{REQUEST_PREFIX}.{namespace}.{service}.*"


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
