"""``natsmesh analyze``'s rules: what looks wrong in the applied resources.

Each rule is a pure function from a :class:`~.snapshot.Snapshot` to the
:class:`Finding` s it sees, only for resources in the snapshot's selection
(the other namespaces it holds are there to resolve references). Codes are
stable: scripts and docs may name them.

Severity follows what the operator does with the resource: ``Error`` when
something the user asked for does not happen (traffic dropped, a subscription
left out, a service without credentials, pods refused), ``Warning`` when it
works but probably not as meant (a grant that admits nobody yet, a version
with no live sidecar), ``Info`` when the rule could not decide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any, Literal

from natsmesh_operator.api import NatsRoute, NatsService
from natsmesh_operator.usercli.snapshot import Snapshot, condition
from natsmesh_operator.webhook.admission import selectors_overlap

log = logging.getLogger(__name__)

Severity = Literal["Error", "Warning", "Info"]
SEVERITY_ORDER: dict[str, int] = {"Error": 0, "Warning": 1, "Info": 2}


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    kind: str
    namespace: str
    name: str
    message: str

    @property
    def resource(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def line(self) -> str:
        return f"{self.severity} [{self.code}] ({self.resource}) {self.message}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def sort_key(self) -> tuple[int, str, str, str, str, str]:
        return (
            SEVERITY_ORDER[self.severity],
            self.code,
            self.namespace,
            self.kind,
            self.name,
            self.message,
        )


def _svc(svc: NatsService, code: str, severity: Severity, message: str) -> Finding:
    return Finding(
        code, severity, "NatsService", str(svc.metadata.namespace), str(svc.metadata.name), message
    )


def _route(route: NatsRoute, code: str, severity: Severity, message: str) -> Finding:
    return Finding(
        code,
        severity,
        "NatsRoute",
        str(route.metadata.namespace),
        str(route.metadata.name),
        message,
    )


def _subsets(snap: Snapshot, namespace: str, service: str) -> list[NatsService]:
    return [s for s in snap.services_in(namespace) if s.service_name == service]


def _rule_label(route: NatsRoute, index: int) -> str:
    name = route.spec.rules[index].name
    return f"rule {name}" if name else f"rule #{index + 1}"


# --------------------------------------------------------------------------
# routes
# --------------------------------------------------------------------------


def route_targets(snap: Snapshot) -> Iterator[Finding]:
    """NM001 a destination version no NatsService serves; NM003 a route to no service."""
    for route in snap.routes:
        ns = str(route.metadata.namespace)
        if not snap.in_scope(ns):
            continue
        subsets = _subsets(snap, ns, route.spec.service)
        if not subsets:
            yield _route(
                route,
                "NM003",
                "Error",
                f"service {route.spec.service} has no NatsService in {ns}: the route applies "
                "to nothing (spec.service is the mesh service: a NatsService's spec.service, "
                "else its name)",
            )
            continue
        versions = {s.spec.version for s in subsets}
        for i, rule in enumerate(route.spec.rules):
            for dest in rule.destinations:
                # A 0% destination sends nothing: the webhook does not warn either.
                if dest.weight and dest.version not in versions:
                    yield _route(
                        route,
                        "NM001",
                        "Error",
                        f"{_rule_label(route, i)}: version {dest.version} of {route.spec.service} "
                        f"has no NatsService (versions: {', '.join(sorted(versions))}); the "
                        f"operator drops it and its {dest.weight}% go to the other destinations",
                    )


def route_endpoints(snap: Snapshot) -> Iterator[Finding]:
    """NM002 a destination version whose sidecars are all gone (status.endpoints 0)."""
    for route in snap.routes:
        ns = str(route.metadata.namespace)
        if not snap.in_scope(ns):
            continue
        by_version: dict[str, list[NatsService]] = {}
        for s in _subsets(snap, ns, route.spec.service):
            by_version.setdefault(s.spec.version, []).append(s)
        reported: set[str] = set()
        for i, rule in enumerate(route.spec.rules):
            for dest in rule.destinations:
                counts = [s.status.endpoints for s in by_version.get(dest.version, [])]
                # Not counted yet (None) is not zero: the operator may be starting.
                if not counts or None in counts or sum(c or 0 for c in counts) > 0:
                    continue
                if dest.weight == 0 or dest.version in reported:
                    continue
                reported.add(dest.version)
                yield _route(
                    route,
                    "NM002",
                    "Warning",
                    f"{_rule_label(route, i)}: version {dest.version} of {route.spec.service} has "
                    f"no endpoints (no sidecar answers): its {dest.weight}% fail with 503 "
                    "no_responders",
                )


# --------------------------------------------------------------------------
# events
# --------------------------------------------------------------------------


def subscriptions(snap: Snapshot) -> Iterator[Finding]:
    """NM004 a subscription to a service nobody runs; NM005 to a topic it does not publish."""
    for svc in snap.services:
        ns = str(svc.metadata.namespace)
        if not snap.in_scope(ns):
            continue
        for sub in svc.spec.events.subscriptions:
            source_ns = sub.namespace or ns
            label = f"subscription {source_ns}/{sub.service}/{sub.topic}"
            if source_ns in snap.unreadable:
                yield _svc(
                    svc, "NM090", "Info", f"{label}: cannot list namespace {source_ns} to check it"
                )
                continue
            publishers = _subsets(snap, source_ns, sub.service)
            if not publishers:
                yield _svc(
                    svc,
                    "NM004",
                    "Error",
                    f"{label}: no NatsService serves {sub.service} in {source_ns}, so nobody "
                    "publishes it; the operator leaves the subscription out",
                )
                continue
            topics = {p.topic for s in publishers for p in s.spec.events.publishes}
            if sub.topic not in topics:
                listed = ", ".join(sorted(topics)) or "none"
                yield _svc(
                    svc,
                    "NM005",
                    "Error",
                    f"{label}: {sub.service} does not publish {sub.topic} (it publishes: "
                    f"{listed}); the operator leaves the subscription out",
                )
                continue
            if source_ns != ns and not _admits(snap, publishers[0], ns, svc.service_name):
                yield _svc(
                    svc,
                    "NM011",
                    "Error",
                    f"{label}: {sub.service} in {source_ns} does not list a NatsService of "
                    f"{svc.service_name}.{ns} in allowedCallers (e.g. "
                    f"{{name: {svc.metadata.name}, namespace: {ns}}}), so the subscription "
                    "is refused",
                )


def _admits(snap: Snapshot, target: NatsService, namespace: str, service: str) -> bool:
    """Whether ``target``'s allowedCallers name a resource serving ``namespace``/``service``."""
    target_ns = str(target.metadata.namespace)
    for ref in target.spec.allowed_callers:
        ref_ns = ref.namespace or target_ns
        if ref_ns != namespace:
            continue
        if any(
            s.metadata.name == ref.name and s.service_name == service
            for s in snap.services_in(ref_ns)
        ):
            return True
    return False


# --------------------------------------------------------------------------
# callers
# --------------------------------------------------------------------------


def callers(snap: Snapshot) -> Iterator[Finding]:
    """NM006 an allowedCallers entry naming no NatsService.

    A Warning, as the operator sees it (``CallersResolved`` False, the callee
    still Ready): the caller may come later, but a typo looks the same.
    """
    for svc in snap.services:
        ns = str(svc.metadata.namespace)
        if not snap.in_scope(ns):
            continue
        for ref in svc.spec.allowed_callers:
            ref_ns = ref.namespace or ns
            if ref_ns in snap.unreadable:
                yield _svc(
                    svc,
                    "NM090",
                    "Info",
                    f"allowedCallers {ref_ns}/{ref.name}: cannot list namespace {ref_ns} "
                    "to check it",
                )
                continue
            names = {str(s.metadata.name) for s in snap.services_in(ref_ns)}
            if ref.name in names:
                continue
            hint = ""
            same_service = sorted(
                str(s.metadata.name) for s in snap.services_in(ref_ns) if s.service_name == ref.name
            )
            if same_service:
                hint = (
                    f" (did you mean {', '.join(same_service)}? entries name resources, "
                    "not spec.service)"
                )
            yield _svc(
                svc,
                "NM006",
                "Warning",
                f"allowedCallers names {ref_ns}/{ref.name}: no such NatsService, so the entry "
                f"admits nobody{hint}",
            )


# --------------------------------------------------------------------------
# selectors and subjects
# --------------------------------------------------------------------------


def selectors(snap: Snapshot) -> Iterator[Finding]:
    """NM007 overlapping selectors; NM008 a selector that matches no pod."""
    for ns in snap.namespaces:
        services = sorted(snap.services_in(ns), key=lambda s: str(s.metadata.name))
        pods = snap.pods.get(ns)
        for a, b in combinations(services, 2):
            if not selectors_overlap(a.spec.selector, b.spec.selector):
                continue
            both = [
                p.name
                for p in pods or ()
                if a.spec.selector.matches(p.labels) and b.spec.selector.matches(p.labels)
            ]
            where = f": pods {', '.join(sorted(both)[:5])} match both" if both else ""
            yield _svc(
                b,
                "NM007",
                "Error",
                f"selector overlaps NatsService {a.metadata.name}'s{where}; a pod selected by "
                "two NatsServices gets no sidecar (the webhook refuses it): make the "
                "selectors exclusive",
            )
        if pods is None:
            continue
        for svc in services:
            if not any(svc.spec.selector.matches(p.labels) for p in pods):
                yield _svc(
                    svc,
                    "NM008",
                    "Warning",
                    f"selector {_selector_text(svc)} matches no pod in {ns}: check the labels "
                    "of the workload's pod template",
                )


def _selector_text(svc: NatsService) -> str:
    sel = svc.spec.selector
    parts = [f"{k}={v}" for k, v in sorted(sel.match_labels.items())]
    for req in sel.match_expressions:
        values = f" ({','.join(req.values)})" if req.values else ""
        parts.append(f"{req.key} {req.operator}{values}")
    return ",".join(parts)


def subjects(snap: Snapshot) -> Iterator[Finding]:
    """NM012 two NatsServices serving one service and version."""
    for ns in snap.namespaces:
        claimed: dict[tuple[str, str], NatsService] = {}
        for svc in sorted(
            snap.services_in(ns),
            key=lambda s: (
                not s.metadata.creation_timestamp,
                s.metadata.creation_timestamp or "",
                s.metadata.uid or "",
                str(s.metadata.name),
            ),
        ):
            key = (svc.service_name, svc.spec.version)
            owner = claimed.setdefault(key, svc)
            if owner is not svc:
                yield _svc(
                    svc,
                    "NM012",
                    "Error",
                    f"{svc.service_name} version {svc.spec.version} is already served by "
                    f"NatsService {owner.metadata.name} (created first); this one gets no "
                    "credentials: change spec.service or spec.version",
                )


# --------------------------------------------------------------------------
# what the operator and the API server said
# --------------------------------------------------------------------------


def invalid(snap: Snapshot) -> Iterator[Finding]:
    """NM009 a stored resource the models refuse."""
    for item in snap.invalid:
        if snap.in_scope(item.namespace):
            first = item.error.strip().splitlines()[0] if item.error.strip() else item.error
            yield Finding(
                "NM009",
                "Error",
                item.kind,
                item.namespace,
                item.name,
                f"invalid, left out by the operator: {first}",
            )


def not_ready(snap: Snapshot) -> Iterator[Finding]:
    """NM010 the operator reports Ready=False."""
    resources: list[NatsService | NatsRoute] = [*snap.services, *snap.routes]
    for res in resources:
        ns = str(res.metadata.namespace)
        if not snap.in_scope(ns):
            continue
        ready = condition(res, "Ready")
        if ready is not None and ready.status == "False":
            yield Finding(
                "NM010",
                "Warning",
                res.KIND,
                ns,
                str(res.metadata.name),
                f"Ready=False ({ready.reason}): {ready.message}",
            )


Rule = Callable[[Snapshot], Iterator[Finding]]

#: Every rule, in the order of their codes' first use.
RULES: tuple[Rule, ...] = (
    route_targets,
    route_endpoints,
    subscriptions,
    callers,
    selectors,
    invalid,
    not_ready,
    subjects,
)


GENERIC = "NM010"
"""Ready=False says again what a specific finding already explains: left out then."""


def analyze(snap: Snapshot, rules: tuple[Rule, ...] = RULES) -> list[Finding]:
    """Every finding of ``rules``, errors first, then by code and resource."""
    found = {f for rule in rules for f in rule(snap)}
    explained = {(f.kind, f.namespace, f.name) for f in found if f.code != GENERIC}
    kept = (f for f in found if f.code != GENERIC or (f.kind, f.namespace, f.name) not in explained)
    return sorted(kept, key=Finding.sort_key)
