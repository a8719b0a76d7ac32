"""``natsmesh status``'s tables, built from a snapshot (and consumer lag) alone.

Pure: the resources in, rows out. Who may call whom is resolved the way the
operator resolves it (:mod:`natsmesh_operator.wiring.grants` over the
resources that hold a mesh service), so a grant naming a resource that is
missing or refused shows as admitting nobody, as it does on the wire.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from natsmesh_operator.api import NatsRoute, NatsService, Rule
from natsmesh_operator.handlers.intents import service_intent
from natsmesh_operator.usercli import table
from natsmesh_operator.usercli.snapshot import Snapshot, condition
from natsmesh_operator.wiring import grants
from natsmesh_operator.wiring.desired import ServiceIntent
from natsmesh_operator.wiring.plan import plan
from natsmesh_sidecar import subjects

log = logging.getLogger(__name__)

NONE = "-"


@dataclass(frozen=True)
class ConsumerLag:
    """One durable consumer's backlog, as JetStream counts it."""

    pending: int
    """Events in the stream not yet delivered to the subscriber."""
    ack_pending: int
    """Delivered, not yet acknowledged (being handled, or about to be redelivered)."""
    redelivered: int
    """Delivered more than once and still not acknowledged."""


ConsumerKey = tuple[str, str, str]
"""``(publisher namespace, stream, consumer)``: where a consumer lives."""


@dataclass(frozen=True)
class ServiceRow:
    namespace: str
    name: str
    service: str
    version: str
    ready: str
    endpoints: str
    subject: str


@dataclass(frozen=True)
class CallerRow:
    namespace: str
    service: str
    callers: tuple[str, ...]
    """``namespace/*`` for a whole namespace, ``namespace/service`` per admitted
    identity, and entries that admit nobody with why."""


@dataclass(frozen=True)
class RouteRow:
    namespace: str
    route: str
    service: str
    rule: str
    match: str
    destinations: str
    timeout: str
    retries: str
    ready: str


@dataclass(frozen=True)
class EventRow:
    namespace: str
    publisher: str
    topic: str
    subscriber: str
    delivery: str
    pending: str
    ack_pending: str
    redelivered: str


@dataclass(frozen=True)
class MeshStatus:
    services: tuple[ServiceRow, ...] = ()
    callers: tuple[CallerRow, ...] = ()
    routes: tuple[RouteRow, ...] = ()
    events: tuple[EventRow, ...] = ()
    lag_note: str = ""
    """Why the lag columns are empty, if they are."""
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "services": [asdict(r) for r in self.services],
            "callers": [asdict(r) | {"callers": list(r.callers)} for r in self.callers],
            "routes": [asdict(r) for r in self.routes],
            "events": [asdict(r) for r in self.events],
            "lagNote": self.lag_note,
            "notes": list(self.notes),
        }

    def render(self, *, all_namespaces: bool) -> str:
        sections: list[tuple[str, list[str], list[list[str]]]] = [
            (
                "SERVICES",
                ["NAMESPACE", "NAME", "SERVICE", "VERSION", "READY", "ENDPOINTS", "SUBJECT"],
                [list(_cells(r)) for r in self.services],
            ),
            (
                "CALLERS",
                ["NAMESPACE", "SERVICE", "ALLOWED CALLERS"],
                [[r.namespace, r.service, ", ".join(r.callers) or "none"] for r in self.callers],
            ),
            (
                "ROUTES",
                [
                    "NAMESPACE",
                    "ROUTE",
                    "SERVICE",
                    "RULE",
                    "MATCH",
                    "DESTINATIONS",
                    "TIMEOUT",
                    "RETRIES",
                    "READY",
                ],
                [list(_cells(r)) for r in self.routes],
            ),
            (
                "EVENTS",
                [
                    "NAMESPACE",
                    "PUBLISHER",
                    "TOPIC",
                    "SUBSCRIBER",
                    "DELIVERY",
                    "PENDING",
                    "ACK PENDING",
                    "REDELIVERED",
                ],
                [list(_cells(r)) for r in self.events],
            ),
        ]
        out: list[str] = []
        for title, headers, rows in sections:
            if not all_namespaces:
                headers, rows = table.without_column(headers, rows, "NAMESPACE")
            out.append(title)
            out.append(table.render(headers, rows) if rows else "(none)")
            out.append("")
        if self.lag_note:
            out.append(f"lag: {self.lag_note}")
        out += list(self.notes)
        return "\n".join(out).rstrip() + "\n"


def _cells(row: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in asdict(row).values())


# --------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------


def ready_text(resource: NatsService | NatsRoute) -> str:
    ready = condition(resource, "Ready")
    if ready is None:
        return "Unknown"
    return ready.status if ready.status == "True" else f"{ready.status} ({ready.reason})"


def service_rows(snap: Snapshot) -> list[ServiceRow]:
    rows = [
        ServiceRow(
            namespace=str(s.metadata.namespace),
            name=str(s.metadata.name),
            service=s.service_name,
            version=s.spec.version,
            ready=ready_text(s),
            endpoints=NONE if s.status.endpoints is None else str(s.status.endpoints),
            subject=s.status.subject or NONE,
        )
        for s in snap.services
        if snap.in_scope(s.metadata.namespace)
    ]
    return sorted(rows, key=lambda r: (r.namespace, r.service, r.version, r.name))


def _intents(services: Sequence[NatsService]) -> list[ServiceIntent]:
    out = []
    for svc in services:
        try:
            out.append(service_intent(svc))
        except ValueError as exc:  # the operator leaves it out too
            log.debug("%s/%s left out: %s", svc.metadata.namespace, svc.metadata.name, exc)
    return out


def holding_services(
    services: Sequence[NatsService],
) -> dict[grants.Identity, list[ServiceIntent]]:
    """Per mesh service, the version subsets that hold a NATS user, first claimant first.

    What :func:`natsmesh_operator.wiring.plan.plan` keeps after refusing
    conflicting claims: exactly what :func:`grants.resolve` expects.
    """
    intents = _intents(services)
    held = {(u.namespace, u.resource) for u in plan(intents).users}
    out: dict[grants.Identity, list[ServiceIntent]] = {}
    for i in sorted(intents, key=lambda i: (*i.claim_order, i.version, i.resource_name)):
        if (i.namespace, i.resource_name) in held:
            out.setdefault(i.key, []).append(i)
    return out


def caller_rows(snap: Snapshot) -> list[CallerRow]:
    services = holding_services(snap.services)
    admitted, _ = grants.resolve(services)
    held = grants.holders(services)
    rows = []
    for key, subsets in sorted(services.items()):
        ns = key[0]
        if not snap.in_scope(ns):
            continue
        primary = subsets[0]
        shown: list[str] = [f"{ns}/*"] if primary.allow_same_namespace else []
        shown += [
            f"{c_ns}/{c_svc}"
            for c_ns, c_svc in sorted(admitted[key])
            if not (primary.allow_same_namespace and c_ns == ns)
        ]
        for ref in primary.allowed_callers:
            where = ref.where(ns)
            if where not in held:
                exists = any(str(s.metadata.name) == where[1] for s in snap.services_in(where[0]))
                why = "refused NatsService" if exists else "no such NatsService"
                shown.append(f"{where[0]}/{where[1]} (admits nobody: {why})")
        rows.append(CallerRow(ns, key[1], tuple(shown)))
    return rows


def match_text(rule: Rule) -> str:
    parts = []
    if rule.match.path_prefix != "/":
        parts.append(f"{rule.match.path_prefix}*")
    if rule.match.methods:
        parts.append(",".join(rule.match.methods))
    parts += [f"{k}={v}" for k, v in sorted(rule.match.headers.items())]
    return " ".join(parts) or "*"


def route_rows(snap: Snapshot) -> list[RouteRow]:
    rows = []
    for route in sorted(
        snap.routes, key=lambda r: (str(r.metadata.namespace), str(r.metadata.name))
    ):
        ns = str(route.metadata.namespace)
        if not snap.in_scope(ns):
            continue
        ready = ready_text(route)
        for i, rule in enumerate(route.spec.rules):
            rows.append(
                RouteRow(
                    namespace=ns,
                    route=str(route.metadata.name),
                    service=route.spec.service,
                    rule=rule.name or f"#{i + 1}",
                    match=match_text(rule),
                    destinations=" ".join(f"{d.version}={d.weight}%" for d in rule.destinations),
                    timeout=rule.timeout,
                    retries=f"{rule.retries.attempts}x" if rule.retries else NONE,
                    ready=ready if i == 0 else "",
                )
            )
    return rows


def _lag_cells(lag: ConsumerLag | None, known: bool) -> tuple[str, str, str]:
    if lag is None:
        return (NONE, NONE, NONE) if not known else ("?", "?", "?")
    return (str(lag.pending), str(lag.ack_pending), str(lag.redelivered))


def event_rows(snap: Snapshot, lag: Mapping[ConsumerKey, ConsumerLag] | None) -> list[EventRow]:
    """One row per (publisher topic, subscriber); a topic nobody consumes gets one with ``-``.

    ``lag`` None: lag unknown (NATS not asked); a consumer missing from a
    given ``lag`` shows ``?`` (not created, or not reported).
    """
    primary: dict[tuple[str, str], NatsService] = {}
    for s in sorted(snap.services, key=lambda s: str(s.metadata.name)):
        primary.setdefault((str(s.metadata.namespace), s.service_name), s)
    subscribers: dict[tuple[str, str, str], list[tuple[NatsService, str]]] = {}
    for (ns, _), svc in primary.items():
        for sub in svc.spec.events.subscriptions:
            source = (sub.namespace or ns, sub.service, sub.topic)
            subscribers.setdefault(source, []).append((svc, sub.delivery))
    rows: list[EventRow] = []
    published: set[tuple[str, str, str]] = set()
    for (ns, name), svc in sorted(primary.items()):
        for pub in svc.spec.events.publishes:
            published.add((ns, name, pub.topic))
            subs = subscribers.get((ns, name, pub.topic), [])
            shown = [
                (s, d) for s, d in subs if snap.in_scope(ns) or snap.in_scope(s.metadata.namespace)
            ]
            if not shown and snap.in_scope(ns):
                rows.append(EventRow(ns, name, pub.topic, NONE, NONE, NONE, NONE, NONE))
            for sub_svc, delivery in shown:
                sub_ns = str(sub_svc.metadata.namespace)
                key = (
                    ns,
                    subjects.stream_name(name),
                    subjects.consumer_name(
                        sub_svc.service_name, name, pub.topic, sub_ns if sub_ns != ns else None
                    ),
                )
                cells = _lag_cells(None if lag is None else lag.get(key), lag is not None)
                rows.append(
                    EventRow(
                        ns, name, pub.topic, f"{sub_ns}/{sub_svc.service_name}", delivery, *cells
                    )
                )
    for (src_ns, src, topic), subs in sorted(subscribers.items()):
        if (src_ns, src, topic) in published:
            continue
        for sub_svc, delivery in subs:
            sub_ns = str(sub_svc.metadata.namespace)
            if snap.in_scope(sub_ns):
                rows.append(
                    EventRow(
                        src_ns,
                        f"{src} (does not publish it)",
                        topic,
                        f"{sub_ns}/{sub_svc.service_name}",
                        delivery,
                        NONE,
                        NONE,
                        NONE,
                    )
                )
    return sorted(rows, key=lambda r: (r.namespace, r.publisher, r.topic, r.subscriber))


def build(
    snap: Snapshot, lag: Mapping[ConsumerKey, ConsumerLag] | None, lag_note: str = ""
) -> MeshStatus:
    notes = tuple(
        f"note: cannot list namespace {ns}: references into it are not resolved"
        for ns in sorted(snap.unreadable)
    )
    return MeshStatus(
        services=tuple(service_rows(snap)),
        callers=tuple(caller_rows(snap)),
        routes=tuple(route_rows(snap)),
        events=tuple(event_rows(snap, lag)),
        lag_note=lag_note,
        notes=notes,
    )
