"""The route compiler: NatsRoute + the services' versions -> sidecar rules.

The output is the ``rules`` of a :class:`natsmesh_sidecar.config.Destination`
(matches, weighted destinations with precomputed subjects, timeouts, retries,
faults, circuit breaker). Every caller's table carries the same compiled rules
for a target, and the table's ``generation`` hash tells which version a
sidecar runs.

Input is :class:`RouteIntent`, the wiring's own Kubernetes-free type; the
handler converts a NatsRoute resource to it. Traffic-policy parts that already
have a wire type (``Retries``, ``Fault``, ``CircuitBreaker``, ``Match``) are
used as they are, so the compiler only resolves versions and checks weights.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field

from natsmesh_operator.wiring.errors import Problem
from natsmesh_sidecar import subjects
from natsmesh_sidecar.config import (
    CircuitBreaker,
    Fault,
    Match,
    Retries,
    Rule,
    WeightedDestination,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MS = 15_000


@dataclass(frozen=True)
class RouteDestination:
    version: str
    weight: int = 100


@dataclass(frozen=True)
class RouteRule:
    destinations: tuple[RouteDestination, ...]
    name: str = ""
    match: Match = field(default_factory=lambda: Match())
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    retries: Retries = field(default_factory=lambda: Retries())
    fault: Fault | None = None
    circuit_breaker: CircuitBreaker | None = None


@dataclass(frozen=True)
class RouteIntent:
    """One NatsRoute: ordered rules for calls to ``service`` in ``namespace``."""

    namespace: str
    service: str
    rules: tuple[RouteRule, ...]
    resource: str = ""

    @property
    def resource_name(self) -> str:
        return self.resource or self.service


def default_version(versions: Collection[str]) -> str:
    """Which subset gets traffic without a route: ``v1`` if present, else the first."""
    if subjects.DEFAULT_VERSION in versions:
        return subjects.DEFAULT_VERSION
    return sorted(versions)[0]


def default_rules(namespace: str, service: str, versions: Collection[str]) -> tuple[Rule, ...]:
    version = default_version(versions)
    dest = WeightedDestination(
        version=version, weight=100, subject=subjects.request_subject(namespace, service, version)
    )
    return (Rule(name="default", destinations=(dest,)),)


def compile_rules(
    route: RouteIntent, versions: Collection[str]
) -> tuple[tuple[Rule, ...] | None, list[Problem]]:
    """Compile ``route`` against the target's existing versions.

    Returns ``(None, problems)`` when the route cannot be compiled; the caller
    then keeps the default rules so traffic still flows.
    """
    problems: list[Problem] = []

    def bad(reason: str, message: str) -> None:
        problems.append(Problem("NatsRoute", route.namespace, route.resource_name, reason, message))

    if not route.rules:
        bad("NoRules", "a route needs at least one rule")
    rules: list[Rule] = []
    for i, r in enumerate(route.rules):
        label = r.name or f"rule-{i}"
        if not r.destinations:
            bad("NoDestinations", f"rule {label!r} has no destinations")
            continue
        total = sum(d.weight for d in r.destinations)
        if total != 100:
            bad("BadWeights", f"rule {label!r}: destination weights sum to {total}, not 100")
            continue
        missing = sorted({d.version for d in r.destinations} - set(versions))
        if missing:
            have = ", ".join(sorted(versions)) or "none"
            bad(
                "UnknownVersion",
                f"rule {label!r} routes to version(s) {', '.join(missing)} of "
                f"{route.service} which has no such NatsService subset (have: {have})",
            )
            continue
        if r.retries.per_try_timeout_ms > r.timeout_ms:
            bad("BadTimeout", f"rule {label!r}: perTryTimeout exceeds the rule's timeout")
            continue
        rules.append(
            Rule(
                name=label,
                match=r.match,
                destinations=tuple(
                    WeightedDestination(
                        version=d.version,
                        weight=d.weight,
                        subject=subjects.request_subject(route.namespace, route.service, d.version),
                    )
                    for d in r.destinations
                ),
                timeout_ms=r.timeout_ms,
                retries=r.retries,
                fault=r.fault,
                circuit_breaker=r.circuit_breaker,
            )
        )
    if problems:
        return None, problems
    # The sidecar relies on the last rule being a catch-all, so requests that
    # match no rule still go to the default subset instead of failing.
    last = rules[-1]
    if last.match != Match():
        rules.append(default_rules(route.namespace, route.service, versions)[0])
    return tuple(rules), problems
