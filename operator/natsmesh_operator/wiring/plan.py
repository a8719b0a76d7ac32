"""Compute the whole mesh's desired NATS state from the services and routes.

:func:`plan` is a pure function: intents in, :class:`MeshPlan` out (accounts
with exports/imports, users with permissions, streams, consumers, the per-
sidecar :class:`~natsmesh_sidecar.config.MeshTable` s) plus the
:class:`~.errors.Problem` s found. A problem removes only what it touches (one
subscription, one conflicting subset, one route) so one bad resource never
takes the rest of the mesh down.

Account layout: one account per namespace. A cross-namespace call is a service
export of ``mesh.<ns>.<svc>.*.<caller-ns>.<caller>`` in the target's account
and the same import in the caller's account, one per admitted caller; beside
it, for that caller's streamed calls, a service export of its call subjects
``mesh._<ns>.<svc>.*.<caller-ns>.<caller>`` answered with many replies
(``Stream``: the callee's chunks, credit and beats go back on the one reply
subject the caller's first credit opened; see
natsmesh_sidecar.transport.stream.protocol), imported the same way.
Cross-namespace subscriptions use a consumer in the publisher's account
(consumers live beside their stream) whose pull/info API subjects are
exported as services and imported under ``natsmesh.jsapi.<publisher-ns>``,
its ack subject under its own name.
A cross-namespace subscription needs the publisher's consent: the publisher
must admit the subscriber in ``allowedCallers``, otherwise any namespace could
read another tenant's events just by declaring a subscription.

``allowedCallers`` name NatsService resources; :mod:`.grants` resolves them to
the identities they admit in this pass, and everything here uses those.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from natsmesh_operator.wiring import grants
from natsmesh_operator.wiring import routes as routes_mod
from natsmesh_operator.wiring.desired import (
    AccountLimits,
    DeliverPolicy,
    ServiceIntent,
    StreamSettings,
    Subscribe,
)
from natsmesh_operator.wiring.errors import Problem
from natsmesh_operator.wiring.permissions import (
    ConsumerAccess,
    Permissions,
    ack_subject,
    consumer_api_subjects,
    service_permissions,
    tap_permissions,
)
from natsmesh_sidecar import subjects
from natsmesh_sidecar.config import (
    Delivery,
    Destination,
    MeshTable,
    Publication,
    Rule,
    Target,
)

log = logging.getLogger(__name__)

TAP_USER = "natsmesh-tap"
"""The name of each namespace's tap user (and of the Secret its creds live in)."""

DLQ_SETTINGS = StreamSettings(retention="limits", max_age_ms=14 * 24 * 3600 * 1000)


@dataclass(frozen=True, order=True)
class Export:
    subject: str
    kind: Literal["service", "stream"] = "service"
    name: str = ""
    response_type: Literal["Singleton", "Stream"] = "Singleton"


@dataclass(frozen=True, order=True)
class Import:
    subject: str
    """The subject as exported by ``exporter``."""
    exporter: str
    """Namespace whose account exports it."""
    local_subject: str = ""
    """Where it appears in the importing account ('' = the same subject)."""
    kind: Literal["service", "stream"] = "service"
    name: str = ""


@dataclass(frozen=True)
class AccountPlan:
    namespace: str
    exports: tuple[Export, ...] = ()
    imports: tuple[Import, ...] = ()
    limits: AccountLimits = field(default_factory=AccountLimits)


@dataclass(frozen=True)
class UserPlan:
    namespace: str
    service: str
    version: str
    resource: str
    permissions: Permissions

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.resource}"


@dataclass(frozen=True)
class StreamPlan:
    namespace: str
    name: str
    subjects: tuple[str, ...]
    settings: StreamSettings
    description: str = ""
    mesh_owned: bool = False
    """The mesh's own stream (dead letters), not one a NatsService asked for:
    its replicas follow the NATS cluster (the operator's ``NATSMESH_NATS_REPLICAS``),
    not ``settings.replicas``."""


@dataclass(frozen=True)
class ConsumerPlan:
    namespace: str
    """The account the consumer (and its stream) lives in: the publisher's."""
    stream: str
    name: str
    filter_subject: str
    ack_explicit: bool
    ack_wait_ms: int
    max_deliver: int
    backoff_ms: tuple[int, ...]
    deliver_policy: DeliverPolicy
    subscriber: tuple[str, str]
    description: str = ""
    exactly_once: bool = False
    """Its subscriber keeps a completed-key record (in the subscriber's account)."""


@dataclass(frozen=True)
class MeshPlan:
    accounts: Mapping[str, AccountPlan]
    users: tuple[UserPlan, ...]
    streams: tuple[StreamPlan, ...]
    consumers: tuple[ConsumerPlan, ...]
    tables: Mapping[tuple[str, str], MeshTable]
    problems: tuple[Problem, ...] = ()
    targets: Mapping[tuple[str, str], Target] = field(default_factory=dict)
    """Each service's policy for its own namespace's callers (KV ``to.<svc>``)."""
    tap_users: tuple[UserPlan, ...] = ()
    """One per namespace with a service: ``natsmesh tap`` (see :func:`tap_user`)."""

    def kept(self) -> MeshPlan:
        """What is read of a plan once its pass is over: the accounts, streams,
        consumers and problems; not the users' permissions, route tables and
        targets, which are most of a plan (at 1,000 services, ~23,000 sets of
        subjects) and were otherwise held until the next pass had built its own."""
        return replace(self, users=(), tables={}, targets={}, tap_users=())

    def problems_for(self, kind: str, namespace: str, name: str) -> tuple[Problem, ...]:
        return tuple(
            p for p in self.problems if (p.kind, p.namespace, p.name) == (kind, namespace, name)
        )

    def user(self, namespace: str, resource: str) -> UserPlan:
        for u in self.users:
            if (u.namespace, u.resource) == (namespace, resource):
                return u
        raise KeyError(f"no user for {namespace}/{resource}")

    def streams_in(self, namespace: str) -> tuple[StreamPlan, ...]:
        return tuple(s for s in self.streams if s.namespace == namespace)

    def consumers_in(self, namespace: str) -> tuple[ConsumerPlan, ...]:
        return tuple(c for c in self.consumers if c.namespace == namespace)

    def exactly_once_of(self, namespace: str) -> tuple[ConsumerPlan, ...]:
        """The exactlyOnce consumers whose subscribers live in ``namespace``
        (their completed keys are kept in that namespace's account)."""
        return tuple(c for c in self.consumers if c.exactly_once and c.subscriber[0] == namespace)


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


def _svc_problem(i: ServiceIntent, reason: str, message: str, condition: str = "Ready") -> Problem:
    return Problem("NatsService", i.namespace, i.resource_name, reason, message, condition)


def _check_intent(i: ServiceIntent, problems: list[Problem]) -> ServiceIntent | None:
    """Drop what is malformed; None if the service itself cannot be planned."""
    for what, value in (("namespace", i.namespace), ("name", i.name)):
        if not subjects.is_name(value):
            problems.append(_svc_problem(i, "InvalidName", f"{what} {value!r} is not a DNS label"))
            return None
    if not subjects.is_name(i.version):
        problems.append(_svc_problem(i, "InvalidVersion", f"version {i.version!r} is not a label"))
        return None
    pubs = []
    seen: dict[str, StreamSettings] = {}
    for p in i.publishes:
        if not subjects.is_topic(p.topic):
            problems.append(
                _svc_problem(i, "InvalidTopic", f"topic {p.topic!r} is not valid", "StreamsReady")
            )
            continue
        if p.topic in seen:
            continue
        # One stream per service: every topic must agree on how it is stored.
        if seen and p.stream != next(iter(seen.values())):
            first = next(iter(seen))
            problems.append(
                _svc_problem(
                    i,
                    "ConflictingStreamSettings",
                    f"topic {p.topic!r} asks for other stream settings than {first!r}; "
                    "all topics of one service share the stream "
                    f"{subjects.stream_name(i.name)}",
                    "StreamsReady",
                )
            )
            continue
        seen[p.topic] = p.stream
        pubs.append(p)
    subs = []
    for s in i.subscriptions:
        msg = _check_subscription(s)
        if msg:
            problems.append(_svc_problem(i, "InvalidSubscription", msg, "StreamsReady"))
        else:
            subs.append(s)
    return replace(i, publishes=tuple(pubs), subscriptions=tuple(subs))


def _check_subscription(s: Subscribe) -> str:
    where = f"subscription to {s.service}/{s.topic}"
    if not subjects.is_topic(s.topic):
        return f"{where}: topic is not valid"
    if not subjects.is_name(s.service) or (s.namespace and not subjects.is_name(s.namespace)):
        return f"{where}: service or namespace is not a DNS label"
    if s.max_deliver < 1:
        return f"{where}: maxDeliver must be at least 1"
    if s.ack_wait_ms < 1:
        return f"{where}: ackWait must be positive"
    if s.backoff_ms and len(s.backoff_ms) >= s.max_deliver:
        # nats-server refuses this too; say it in the resource's words.
        return (
            f"{where}: {len(s.backoff_ms)} backoff steps need maxDeliver > "
            f"{len(s.backoff_ms)} (is {s.max_deliver})"
        )
    if any(b < 1 for b in s.backoff_ms):
        return f"{where}: backoff steps must be positive"
    if not s.path.startswith("/"):
        return f"{where}: path must start with '/'"
    return ""


def _dedupe(
    intents: Iterable[ServiceIntent], problems: list[Problem]
) -> dict[tuple[str, str], list[ServiceIntent]]:
    """Group subsets by service; refuse two resources claiming one subject.

    The first claimant owns a subject (and, among a service's versions, sets
    the policy the others must match): creation order, never names, so a
    resource created later under a name that sorts first takes nothing over.
    The validating webhook refuses the later claimant; this decides for any
    that got in while it was down. Without creation times (plain intents)
    the order is version, then resource name.
    """
    by_subject: dict[tuple[str, str, str], ServiceIntent] = {}
    for i in sorted(
        intents,
        key=lambda i: (i.namespace, i.name, *i.claim_order, i.version, i.resource_name),
    ):
        key = (i.namespace, i.name, i.version)
        if key in by_subject:
            owner = by_subject[key]
            subject = subjects.request_subject(*key)
            problems.append(
                _svc_problem(
                    i,
                    "SubjectConflict",
                    f"{subject} is already served by NatsService {owner.resource_name}; "
                    "give this one another name or version",
                )
            )
            continue
        by_subject[key] = i
    services: dict[tuple[str, str], list[ServiceIntent]] = defaultdict(list)
    for i in by_subject.values():
        subsets = services[i.key]
        if subsets and not _same_policy(subsets[0], i):
            problems.append(
                _svc_problem(
                    i,
                    "InconsistentSubsets",
                    f"version {i.version} of {i.name} must declare the same allowedCallers and "
                    f"events as NatsService {subsets[0].resource_name} (version "
                    f"{subsets[0].version}): versions are subsets of one service",
                )
            )
            continue
        subsets.append(i)
    return dict(services)


def _same_policy(a: ServiceIntent, b: ServiceIntent) -> bool:
    return (
        _callers(a) == _callers(b)
        and set(a.publishes) == set(b.publishes)
        and set(a.subscriptions) == set(b.subscriptions)
    )


def _callers(i: ServiceIntent) -> tuple[bool, frozenset[tuple[str, str]]]:
    # The entries as written (resources), not what they resolve to this pass.
    return (i.allow_same_namespace, frozenset(c.where(i.namespace) for c in i.allowed_callers))


# --------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sub:
    """A subscription that survived validation, with its resolved names."""

    subscriber: ServiceIntent
    spec: Subscribe
    source: tuple[str, str]
    consumer: str
    stream: str

    @property
    def cross(self) -> bool:
        return self.source[0] != self.subscriber.namespace

    @property
    def api_prefix(self) -> str:
        if self.cross:
            return subjects.imported_js_api_prefix(self.source[0])
        return subjects.JS_API_PREFIX

    @property
    def acks(self) -> bool:
        return self.spec.delivery != "atMostOnce"

    @property
    def dead_letter_subject(self) -> str:
        return subjects.dead_letter_subject(
            self.subscriber.namespace, self.subscriber.name, self.consumer
        )


def plan(
    intents: Iterable[ServiceIntent],
    routes: Iterable[routes_mod.RouteIntent] = (),
    *,
    limits: Mapping[str, AccountLimits] | None = None,
) -> MeshPlan:
    """The desired NATS state of the whole mesh; see the module docstring."""
    problems: list[Problem] = []
    intents = list(intents)
    checked = [c for i in intents if (c := _check_intent(i, problems)) is not None]
    services = _dedupe(checked, problems)
    admitted, grant_problems = grants.resolve(services)
    problems += grant_problems
    primary = {k: v[0] for k, v in services.items()}
    # Sorted, not in claim order: route tables stay as they were.
    versions = {k: sorted(s.version for s in v) for k, v in services.items()}
    topics = {k: {p.topic for p in i.publishes} for k, i in primary.items()}

    subs: list[_Sub] = []
    for key, i in sorted(primary.items()):
        for s in i.subscriptions:
            source = s.source(i.namespace)
            label = f"{s.service}.{source[0]}/{s.topic}"
            pub = primary.get(source)
            reason = ""
            if pub is None:
                reason, msg = "UnknownService", f"subscription {label}: no NatsService {source[1]}"
            elif s.topic not in topics[source]:
                reason, msg = (
                    "UnknownTopic",
                    f"subscription {label}: {source[1]} does not publish topic {s.topic!r}",
                )
            elif source[0] != i.namespace and key not in admitted[source]:
                reason, msg = (
                    "SubscriptionNotAllowed",
                    f"subscription {label}: {source[1]} in namespace {source[0]} does not list "
                    f"a NatsService of {i.name}.{i.namespace} (e.g. "
                    f"{{name: {i.resource_name}, namespace: {i.namespace}}}) in allowedCallers",
                )
            if reason:
                for subset in services[key]:
                    problems.append(_svc_problem(subset, reason, msg, "StreamsReady"))
                continue
            cross_ns = i.namespace if source[0] != i.namespace else None
            subs.append(
                _Sub(
                    subscriber=i,
                    spec=s,
                    source=source,
                    consumer=subjects.consumer_name(i.name, source[1], s.topic, cross_ns),
                    stream=subjects.stream_name(source[1]),
                )
            )

    # Only grants across namespaces: they are few (listed by name), while a
    # namespace's own services find each other through their Target keys.
    callable_by: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for target, callers in sorted(admitted.items()):
        for caller in sorted(callers):
            if caller[0] != target[0]:
                callable_by[caller].append(target)

    accounts = _accounts(primary, callable_by, subs, limits or {})
    streams = _streams(primary, subs)
    consumers = tuple(
        ConsumerPlan(
            namespace=s.source[0],
            stream=s.stream,
            name=s.consumer,
            filter_subject=subjects.event_subject(s.source[0], s.source[1], s.spec.topic),
            ack_explicit=s.acks,
            ack_wait_ms=s.spec.ack_wait_ms,
            max_deliver=s.spec.max_deliver if s.acks else 1,
            backoff_ms=s.spec.backoff_ms if s.acks else (),
            deliver_policy=s.spec.deliver_policy,
            subscriber=(s.subscriber.namespace, s.subscriber.name),
            description=f"natsmesh: {s.subscriber.name}.{s.subscriber.namespace} <- {s.spec.topic}",
            exactly_once=s.spec.delivery == "exactlyOnce",
        )
        for s in subs
    )
    subs_of: dict[tuple[str, str], list[_Sub]] = defaultdict(list)
    for sub in subs:
        subs_of[sub.subscriber.key].append(sub)

    users = tuple(
        UserPlan(
            namespace=i.namespace,
            service=i.name,
            version=i.version,
            resource=i.resource_name,
            permissions=service_permissions(
                namespace=i.namespace,
                service=i.name,
                version=i.version,
                admits_namespace=i.allow_same_namespace,
                admitted=admitted[key],
                publish_topics=topics[key],
                consumers=[
                    ConsumerAccess(
                        s.api_prefix,
                        s.stream,
                        s.consumer,
                        s.dead_letter_subject,
                        s.acks,
                        source_namespace=s.source[0],
                        exactly_once=s.spec.delivery == "exactlyOnce",
                    )
                    for s in subs_of[key]
                ],
            ),
        )
        for key, subsets in sorted(services.items())
        for i in subsets
    )

    refused = _refused(intents, versions, problems)
    compiled, route_problems = _compile_routes(routes, versions, refused)
    problems += route_problems
    dest_cache: dict[tuple[str, str], Destination] = {}
    targets = {
        key: _target(i, admitted[key], versions, compiled, dest_cache)
        for key, i in sorted(primary.items())
    }
    tables = {
        key: _table(key, primary, versions, callable_by[key], subs_of[key], compiled, dest_cache)
        for key in sorted(primary)
    }
    return MeshPlan(
        accounts=accounts,
        users=users,
        streams=streams,
        consumers=consumers,
        tables=tables,
        problems=tuple(sorted(set(problems))),
        targets=targets,
        tap_users=tuple(tap_user(ns) for ns in sorted({ns for ns, _ in primary})),
    )


def tap_user(namespace: str) -> UserPlan:
    """The namespace's tap user: whoever may read its Secret may tap the namespace."""
    return UserPlan(
        namespace=namespace,
        service="",
        version="",
        resource=TAP_USER,
        permissions=tap_permissions(namespace),
    )


def _accounts(
    primary: Mapping[tuple[str, str], ServiceIntent],
    callable_by: Mapping[tuple[str, str], list[tuple[str, str]]],
    subs: list[_Sub],
    limits: Mapping[str, AccountLimits],
) -> dict[str, AccountPlan]:
    exports: dict[str, set[Export]] = defaultdict(set)
    imports: dict[str, set[Import]] = defaultdict(set)
    for (caller_ns, caller_svc), targets in callable_by.items():
        for t_ns, t_svc in targets:  # other namespaces only (see plan())
            # Per caller: the caller's identity is in the subject, and its own
            # publish permission (one wildcard) already ends in that identity.
            subject = subjects.import_subject(t_ns, t_svc, caller_ns, caller_svc)
            label = f"{t_svc}.{t_ns} from {caller_svc}"
            exports[t_ns].add(Export(subject, "service", label))
            imports[caller_ns].add(Import(subject, t_ns, "", "service", label))
            # Its streamed calls' subjects: only this caller can publish them
            # (its identity last) and only into this callee's account. The
            # unary subject above stays Singleton: a Stream reply mapping
            # outlives its answer until nats-server's response threshold.
            calls = subjects.stream_serve_subject(t_ns, t_svc, caller_ns, caller_svc)
            streams = f"{label} (streams)"
            exports[t_ns].add(Export(calls, "service", streams, "Stream"))
            imports[caller_ns].add(Import(calls, t_ns, "", "service", streams))
    for s in subs:
        if not s.cross:
            continue
        pub_ns, sub_ns = s.source[0], s.subscriber.namespace
        nxt, info = consumer_api_subjects(subjects.JS_API_PREFIX, s.stream, s.consumer)
        local_nxt, local_info = consumer_api_subjects(s.api_prefix, s.stream, s.consumer)
        # MSG.NEXT answers one request with many messages: a Stream response.
        exports[pub_ns].add(Export(nxt, "service", f"{s.consumer} next", "Stream"))
        exports[pub_ns].add(Export(info, "service", f"{s.consumer} info"))
        imports[sub_ns].add(Import(nxt, pub_ns, local_nxt, "service", f"{s.consumer} next"))
        imports[sub_ns].add(Import(info, pub_ns, local_info, "service", f"{s.consumer} info"))
        if s.acks:
            ack = ack_subject(s.stream, s.consumer)
            exports[pub_ns].add(Export(ack, "service", f"{s.consumer} ack"))
            imports[sub_ns].add(Import(ack, pub_ns, "", "service", f"{s.consumer} ack"))
    namespaces = sorted({ns for ns, _ in primary})
    return {
        ns: AccountPlan(
            namespace=ns,
            exports=tuple(sorted(exports[ns])),
            imports=tuple(sorted(imports[ns])),
            limits=limits.get(ns, AccountLimits()),
        )
        for ns in namespaces
    }


def _streams(
    primary: Mapping[tuple[str, str], ServiceIntent], subs: list[_Sub]
) -> tuple[StreamPlan, ...]:
    out: list[StreamPlan] = []
    for (ns, svc), i in sorted(primary.items()):
        if i.publishes:
            out.append(
                StreamPlan(
                    namespace=ns,
                    name=subjects.stream_name(svc),
                    subjects=tuple(
                        sorted(subjects.event_subject(ns, svc, p.topic) for p in i.publishes)
                    ),
                    settings=i.publishes[0].stream,
                    description=f"natsmesh: events of {svc}.{ns}",
                )
            )
    dlq = sorted({s.subscriber.key for s in subs if s.acks})
    for ns, svc in dlq:
        out.append(
            StreamPlan(
                namespace=ns,
                name=subjects.dead_letter_stream(svc),
                subjects=(subjects.dead_letter_wildcard(ns, svc),),
                settings=DLQ_SETTINGS,
                description=f"natsmesh: dead letters of {svc}.{ns}",
                mesh_owned=True,
            )
        )
    return tuple(out)


def _refused(
    intents: Iterable[ServiceIntent],
    versions: Mapping[tuple[str, str], list[str]],
    problems: Iterable[Problem],
) -> dict[tuple[str, str], dict[str, str]]:
    """Why each version that has a NatsService but no usable subset was left out."""
    reasons = {
        (p.namespace, p.name): p.reason
        for p in problems
        if p.kind == "NatsService" and p.condition == "Ready"
    }
    out: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for i in intents:
        if i.version in versions.get(i.key, ()):
            continue
        reason = reasons.get((i.namespace, i.resource_name), "not usable")
        out[i.key].setdefault(i.version, f"NatsService {i.resource_name} is {reason}")
    return dict(out)


def _compile_routes(
    routes: Iterable[routes_mod.RouteIntent],
    versions: Mapping[tuple[str, str], list[str]],
    refused: Mapping[tuple[str, str], Mapping[str, str]],
) -> tuple[dict[tuple[str, str], tuple[Rule, ...]], list[Problem]]:
    compiled: dict[tuple[str, str], tuple[Rule, ...]] = {}
    problems: list[Problem] = []
    for r in sorted(routes, key=lambda r: (r.namespace, r.service, r.resource_name)):
        key = (r.namespace, r.service)
        if key not in versions:
            why = "; ".join(sorted(refused.get(key, {}).values()))
            problems.append(
                Problem(
                    "NatsRoute",
                    r.namespace,
                    r.resource_name,
                    "UnknownService",
                    f"no usable NatsService {r.service} in namespace {r.namespace}"
                    + (f" ({why})" if why else ""),
                )
            )
            continue
        if key in compiled:
            problems.append(
                Problem(
                    "NatsRoute",
                    r.namespace,
                    r.resource_name,
                    "RouteConflict",
                    f"another NatsRoute already routes {r.service}; only one route per service",
                )
            )
            continue
        rules, found = routes_mod.compile_rules(r, versions[key], refused.get(key))
        problems += found
        if rules is not None:
            compiled[key] = rules
    return compiled, problems


def _destination(
    target: tuple[str, str],
    versions: Mapping[tuple[str, str], list[str]],
    compiled: Mapping[tuple[str, str], tuple[Rule, ...]],
    dest_cache: dict[tuple[str, str], Destination],
) -> Destination:
    # A target's policy is the same for every caller: built once per pass.
    dest = dest_cache.get(target)
    if dest is None:
        t_ns, t_svc = target
        rules = compiled.get(target) or routes_mod.default_rules(t_ns, t_svc, versions[target])
        dest = dest_cache[target] = Destination(namespace=t_ns, service=t_svc, rules=rules)
    return dest


def _target(
    i: ServiceIntent,
    admitted: Iterable[tuple[str, str]],
    versions: Mapping[tuple[str, str], list[str]],
    compiled: Mapping[tuple[str, str], tuple[Rule, ...]],
    dest_cache: dict[tuple[str, str], Destination],
) -> Target:
    dest = _destination(i.key, versions, compiled, dest_cache)
    callers = sorted({svc for ns, svc in admitted if ns == i.namespace})
    return Target(
        namespace=i.namespace,
        service=i.name,
        admits_namespace=i.allow_same_namespace,
        callers=tuple(callers),
        rules=dest.rules,
    ).with_generation()


def _table(
    key: tuple[str, str],
    primary: Mapping[tuple[str, str], ServiceIntent],
    versions: Mapping[tuple[str, str], list[str]],
    targets: list[tuple[str, str]],
    subs: list[_Sub],
    compiled: Mapping[tuple[str, str], tuple[Rule, ...]],
    dest_cache: dict[tuple[str, str], Destination],
) -> MeshTable:
    ns, svc = key
    i = primary[key]
    # Other namespaces' services are only known when callable, so a tenant
    # cannot map another tenant's services by probing for 403 vs 404. Its own
    # namespace's are Target keys (404 when there is none, 403 when it does
    # not admit the caller).
    known = sorted(subjects.host_of(n, s) for n, s in targets)
    destinations = {
        subjects.host_of(*target): _destination(target, versions, compiled, dest_cache)
        for target in sorted(targets)
    }
    publishes = {
        p.topic: Publication(
            topic=p.topic,
            subject=subjects.event_subject(ns, svc, p.topic),
            stream=subjects.stream_name(svc),
        )
        for p in sorted(i.publishes, key=lambda p: p.topic)
    }
    deliveries = tuple(
        Delivery(
            stream=s.stream,
            consumer=s.consumer,
            topic=s.spec.topic,
            source=subjects.host_of(*s.source),
            path=s.spec.path,
            mode=s.spec.delivery,
            max_deliver=s.spec.max_deliver if s.acks else 1,
            ack_wait_ms=s.spec.ack_wait_ms,
            backoff_ms=s.spec.backoff_ms,
            dead_letter_subject=s.dead_letter_subject,
            api_prefix=s.api_prefix,
        )
        for s in sorted(subs, key=lambda s: s.consumer)
    )
    return MeshTable(
        namespace=ns,
        service=svc,
        known=tuple(known),
        destinations=destinations,
        publishes=publishes,
        subscriptions=deliveries,
    ).with_generation()
