"""The route compiler: NatsRoute + the services' versions -> sidecar rules.

The output is the ``rules`` of a :class:`natsmesh_sidecar.config.Destination`
(matches, weighted destinations with precomputed subjects, timeouts, retries,
faults, circuit breaker). Every caller's table carries the same compiled rules
for a target, and the table's ``generation`` hash tells which version a
sidecar runs.

Input is :class:`RouteIntent`, the wiring's own Kubernetes-free type; the
handler converts a NatsRoute resource to it. Traffic-policy parts that already
have a wire type (``Retries``, ``Fault``, ``CircuitBreaker``, ``Match``,
``StreamPolicy``) are
used as they are, so the compiler only resolves versions and checks weights.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from natsmesh_operator.wiring.errors import Problem
from natsmesh_sidecar import subjects
from natsmesh_sidecar.config import (
    CircuitBreaker,
    Fault,
    Match,
    Retries,
    Rule,
    StreamPolicy,
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
    max_body_bytes: int = 0
    stream: StreamPolicy | None = None


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


def rescale(weights: Sequence[int]) -> list[int]:
    """``weights`` scaled to sum to 100 (largest remainder); all equal if they sum to 0.

    What is left of a rule once versions are dropped keeps its proportions:
    90/10 over v1/v2 without v2 is v1 100; 0 to the only version left is 100.
    """
    if not weights:
        return []
    total = sum(weights)
    shares = [100 * (w if total else 1) / (total or len(weights)) for w in weights]
    out = [int(s) for s in shares]
    by_remainder = sorted(range(len(out)), key=lambda k: (out[k] - shares[k], k))
    for k in by_remainder[: 100 - sum(out)]:
        out[k] += 1
    return out


def compile_rules(
    route: RouteIntent,
    versions: Collection[str],
    refused: Mapping[str, str] | None = None,
) -> tuple[tuple[Rule, ...] | None, list[Problem]]:
    """Compile ``route`` against the target's usable versions.

    A destination version that is not usable (``refused`` says why a
    NatsService of it was left out; otherwise there is none) is dropped: the
    rule's other destinations share its weight, a rule left with none is
    dropped, and a ``VersionsDropped`` problem names what went and why, so
    the route's status never claims it is applied as written. Returns
    ``(None, problems)`` when the route cannot be compiled at all; the caller
    then keeps the default rules so traffic still flows.
    """
    problems: list[Problem] = []
    refused = refused or {}

    def bad(reason: str, message: str) -> None:
        problems.append(Problem("NatsRoute", route.namespace, route.resource_name, reason, message))

    if not route.rules:
        bad("NoRules", "a route needs at least one rule")
    rules: list[Rule] = []
    dropped: dict[str, list[str]] = {}  # version -> rules it was dropped from
    emptied: list[str] = []
    for i, r in enumerate(route.rules):
        label = r.name or f"rule-{i}"
        if not r.destinations:
            bad("NoDestinations", f"rule {label!r} has no destinations")
            continue
        total = sum(d.weight for d in r.destinations)
        if total != 100:
            bad("BadWeights", f"rule {label!r}: destination weights sum to {total}, not 100")
            continue
        if r.retries.per_try_timeout_ms > r.timeout_ms:
            bad("BadTimeout", f"rule {label!r}: perTryTimeout exceeds the rule's timeout")
            continue
        usable = [d for d in r.destinations if d.version in versions]
        for d in r.destinations:
            if d.version not in versions:
                dropped.setdefault(d.version, []).append(label)
        if not usable:
            emptied.append(label)
            continue
        weights = rescale([d.weight for d in usable])
        rules.append(
            Rule(
                name=label,
                match=r.match,
                destinations=tuple(
                    WeightedDestination(
                        version=d.version,
                        weight=w,
                        subject=subjects.request_subject(route.namespace, route.service, d.version),
                    )
                    for d, w in zip(usable, weights, strict=True)
                ),
                timeout_ms=r.timeout_ms,
                retries=r.retries,
                fault=r.fault,
                circuit_breaker=r.circuit_breaker,
                max_body_bytes=r.max_body_bytes,
                stream=r.stream,
            )
        )
    if dropped:
        have = ", ".join(sorted(versions)) or "none"
        why = "; ".join(
            f"{v} ({refused.get(v) or f'no NatsService of {route.service} serves {v}'})"
            for v in sorted(dropped)
        )
        if not rules:
            effect = f"no rule is left, calls take the default route to {default_version(versions)}"
        elif emptied:
            names = ", ".join(repr(e) for e in emptied)
            effect = f"rule(s) {names} dropped, the others share their weight among {have}"
        else:
            effect = f"the rules share their weight among {have}"
        bad("VersionsDropped", f"applied without version(s) {why}: {effect}")
    if not rules or any(p.reason != "VersionsDropped" for p in problems):
        return None, problems
    # The sidecar relies on the last rule being a catch-all, so requests that
    # match no rule still go to the default subset instead of failing.
    last = rules[-1]
    if last.match != Match():
        rules.append(default_rules(route.namespace, route.service, versions)[0])
    return tuple(rules), problems
