"""Routing one outbound request: where it goes, under which rule, and whether it may.

:meth:`Planner.plan` resolves the request's host in the route table (or, for
a service of our own namespace, in its target policy), selects the rule,
picks the weighted destination, checks the sidecar's own publish permission,
the body size (NATS's limit and the rule's ``maxBodyBytes``) and the rule's
circuit breaker, and draws the rule's faults.
What comes out is a :class:`Plan` to send, a refusal to answer with (a
:data:`Result`), or the name of a target whose policy must be fetched first.
Nothing here awaits: the handler (natsmesh_sidecar.calls.outbound) calls it
from the connection's callback.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from natsmesh_sidecar import codec, subjects
from natsmesh_sidecar.edge.request import Request
from natsmesh_sidecar.policy import resilience
from natsmesh_sidecar.policy.table import FORBIDDEN, FOUND, UNKNOWN
from natsmesh_sidecar.policy.targets import MISS
from natsmesh_sidecar.wire import CircuitBreaker, Destination, Rule, Target

if TYPE_CHECKING:
    from natsmesh_sidecar.observe.metrics import Metrics
    from natsmesh_sidecar.observe.tap import Tap
    from natsmesh_sidecar.observe.tracing import Tracer
    from natsmesh_sidecar.policy.permissions import Permissions
    from natsmesh_sidecar.policy.table import Router
    from natsmesh_sidecar.policy.targets import TargetCache
    from natsmesh_sidecar.transport.natsfast import FastPath

logger = logging.getLogger(__name__)

_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
#: (status, headers, body, destination, route, attempts, error code)
Result = tuple[int, list[tuple[str, str]], bytes, str, str, int, str]
#: The circuit breaker of a subject under a rule's config.
BreakerOf = Callable[[str, CircuitBreaker], "resilience.Breaker | None"]


class Mesh(Protocol):
    """What a request reads as it is at that moment, because it changes while
    the sidecar runs: the NATS connection (reconnects, renewals), the route
    table and our namespace's targets (swaps), the publish permissions (new
    creds), the tap."""

    @property
    def nc(self) -> Any: ...
    @property
    def fast(self) -> FastPath | None: ...
    @property
    def router(self) -> Router: ...
    @property
    def targets(self) -> TargetCache | None: ...
    @property
    def permissions(self) -> Permissions: ...
    @property
    def tap(self) -> Tap | None: ...
    def max_body(self) -> int:
        """The largest body one NATS message carries on the current connection."""
        ...


def refusal(
    status: int,
    code: str,
    message: str,
    rid: str,
    dest_key: str = "-",
    route: str = "-",
    attempts: int = 0,
    extra: list[tuple[str, str]] | None = None,
) -> Result:
    """The sidecar's own answer (a JSON error body) as a :data:`Result`."""
    headers = [("content-type", "application/json")]
    if extra:
        headers.extend(extra)
    return status, headers, codec.error_body(code, message, rid), dest_key, route, attempts, code


def body_limit(rule: Rule, rid: str, dest_key: str, attempts: int = 0) -> Result:
    """413 for a request body past its rule's ``max_body_bytes``."""
    limit, name = rule.max_body_bytes, rule.name
    message = f"request body exceeds {limit} bytes, the maxBodyBytes of route {name}"
    return refusal(413, "payload_too_large", message, rid, dest_key, name, attempts)


class Plan:
    """A routed request: everything the NATS attempts and the answer need."""

    __slots__ = ("abort", "breaker", "delay", "dest_key", "head", "rule", "simple", "subject")

    def __init__(
        self,
        dest_key: str,
        rule: Rule,
        subject: str,
        breaker: resilience.Breaker | None,
        delay: float,
        abort: int | None,
        head: bytes,
    ) -> None:
        self.dest_key = dest_key
        self.rule = rule
        self.subject = subject
        self.breaker = breaker
        self.delay = delay
        self.abort = abort
        #: The NATS header block up to the per-attempt timeout (the handler's ``_per_try``).
        self.head = head
        #: No retry and no breaker: a reply is the answer as it is (the handler's ``_answer``).
        self.simple = breaker is None and rule.retries.attempts <= 0


class Planner:
    """Turns a request into a :class:`Plan` or a refusal (see the module docstring)."""

    def __init__(
        self,
        mesh: Mesh,
        *,
        namespace: str,
        service: str,
        metrics: Metrics,
        breaker: BreakerOf,
        tracer: Tracer | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.mesh = mesh
        self.namespace = namespace
        self.service = service
        #: Who we are in errors and in ``Nm-Source`` (``<service>.<namespace>``).
        self.source = subjects.host_of(namespace, service)
        #: Appended to a route table's base subjects: who we are, as callers.
        self.caller_suffix = subjects.caller_suffix(namespace, service)
        self.metrics = metrics
        self.breaker = breaker
        self.tracer = tracer
        self._rand = rand
        #: id(destination) -> what selecting its rule needs (:meth:`_select`).
        self._selection: dict[int, tuple[Destination, bool, Rule | None]] = {}

    def plan(self, req: Request, rid: str, policy: object = MISS) -> Result | Plan | str:
        """Resolve, authorise and plan a request; no awaiting.

        A result tuple answers it at once; a string is the destination whose
        policy must be fetched first (then call again with ``policy``).
        """
        found, dest_key, dest = self.mesh.router.resolve(req.host)
        if dest is None:
            step = self._unresolved(req, rid, found, dest_key, policy)
            if not isinstance(step, Destination):
                return step  # a refusal, or the target whose policy to fetch
            dest = step
        rule = self._rule(req, dest)
        if rule is None:
            message = f"no route of {dest_key} matches {req.path}"
            return refusal(404, "no_route", message, rid, dest_key)
        weighted = rule.destinations
        if len(weighted) == 1:
            # pick_destination's first case, without drawing a random number.
            target = weighted[0] if weighted[0].weight > 0 else None
        else:
            target = resilience.pick_destination(weighted, self._rand())
        if target is None:
            message = f"route {rule.name} has no weighted destination"
            return refusal(503, "no_destination", message, rid, dest_key, rule.name)
        subject = target.subject + self.caller_suffix
        # Inline, not a method each: these run per request.
        if not self.mesh.permissions.can_publish(subject):
            message = f"{self.source} is not permitted to publish to {subject}"
            return refusal(403, "forbidden", message, rid, dest_key, rule.name)
        if len(req.body) > self.mesh.max_body():
            message = "request body exceeds the NATS max_payload"
            return refusal(413, "payload_too_large", message, rid, dest_key, rule.name)
        if rule.max_body_bytes and len(req.body) > rule.max_body_bytes:
            return body_limit(rule, rid, dest_key)
        breaker = None
        if rule.circuit_breaker is not None:
            checked = self._breaker(rid, dest_key, rule, rule.circuit_breaker, subject)
            if isinstance(checked, tuple):
                return checked  # open
            breaker = checked
        delay, abort = 0.0, None
        if rule.fault is not None:
            delay, abort = resilience.fault_decision(rule.fault, self._rand(), self._rand())
        head = request_head(req, rid, self.source, self.tracer)
        stream = rule.stream
        if stream is not None:
            # The callee's end of a stream takes these (its response may stream too).
            head += codec.stream_lines(stream.window, stream.idle_timeout_ms)
        return Plan(dest_key, rule, subject, breaker, delay, abort, head)

    def _unresolved(
        self, req: Request, rid: str, found: int, dest_key: str, policy: object
    ) -> Destination | Result | str:
        """A host the table does not route: a target of our own namespace (its
        own KV key, see natsmesh_sidecar.policy.targets), else a refusal."""
        targets = self.mesh.targets
        if found == UNKNOWN and targets is not None:
            svc, _, ns = dest_key.partition(".")
            if ns == self.namespace:
                if policy is MISS:
                    policy = targets.cached(svc)
                    if policy is MISS:
                        return dest_key
                if isinstance(policy, Target):
                    if policy.admits(self.service):
                        return targets.destinations[svc]
                    found = FORBIDDEN
        if not req.host:
            return refusal(400, "bad_request", "no Host header and no absolute URI", rid)
        if found == FORBIDDEN:
            return refusal(
                403, "forbidden", f"{self.source} may not call {dest_key}", rid, dest_key
            )
        assert found == UNKNOWN
        return refusal(404, "unknown_service", f"no service {dest_key} in the mesh", rid)

    def tunnel_refusal(self, authority: str) -> tuple[int, str, str] | None:
        """Why a CONNECT to ``authority`` is refused; None to open it.

        The tunnel ends here, at our own listener: each request inside is
        routed and authorised as any other, so opening one grants nothing.
        It is refused only where no request inside could succeed: a name the
        mesh does not know (a service of our own namespace may still be
        found, see :meth:`_unresolved`) or one we may not call.
        """
        found, dest_key, _ = self.mesh.router.resolve(authority)
        if found == UNKNOWN:
            svc, _, ns = dest_key.partition(".")
            targets = self.mesh.targets
            # Of our own namespace and not looked up yet: the first request
            # inside will look (and be refused if it must).
            policy = targets.cached(svc) if ns == self.namespace and targets else None
            if isinstance(policy, Target):
                found = FOUND if policy.admits(self.service) else FORBIDDEN
            elif policy is not MISS:
                return (
                    404,
                    "unknown_service",
                    f"no service {dest_key} in the mesh (CONNECT reaches mesh services only)",
                )
        if found == FORBIDDEN:
            return 403, "forbidden", f"{self.source} may not call {dest_key}"
        return None

    def _rule(self, req: Request, dest: Destination) -> Rule | None:
        """The first of the destination's rules that matches the request."""
        selection = self._selection.get(id(dest))
        if selection is None or selection[0] is not dest:
            selection = self._select(dest)
        sole = selection[2]
        if sole is not None:
            # One rule matching on the path alone: what select_rule decides.
            return sole if req.path.startswith(sole.match.path_prefix) else None
        return resilience.select_rule(
            dest.rules,
            req.method,
            req.path,
            req.lower_headers() if selection[1] else req.special,
        )

    def _select(self, dest: Destination) -> tuple[Destination, bool, Rule | None]:
        """(dest, whether a rule matches on headers, its sole rule if that rule
        matches on the path alone); cached per destination object, which the
        entry keeps alive so its id is not reused."""
        rules = dest.rules
        sole = rules[0] if len(rules) == 1 else None
        if sole is not None and (sole.match.methods or sole.match.headers):
            sole = None
        found = (dest, any(r.match.headers for r in rules), sole)
        if len(self._selection) >= 1024:
            self._selection.clear()  # tables were swapped many times
        self._selection[id(dest)] = found
        return found

    def _breaker(
        self, rid: str, dest_key: str, rule: Rule, config: CircuitBreaker, subject: str
    ) -> Result | resilience.Breaker | None:
        """The subject's circuit breaker under the rule's config, or a refusal while open."""
        breaker = self.breaker(subject, config)
        if breaker is not None and not breaker.allow(now := time.monotonic()):
            self.metrics.circuit_refused.labels(subject).inc()
            return refusal(
                503,
                "circuit_open",
                f"circuit to {subject} is open",
                rid,
                dest_key,
                rule.name,
                extra=[("retry-after", str(breaker.retry_after(now)))],
            )
        return breaker


def request_head(req: Request, rid: str, source: str, tracer: Tracer | None) -> bytes:
    """The request's NATS header block, less Nm-Timeout-Ms and the blank line.

    The app's headers (:func:`codec.nats_lines`), then the mesh's and the two
    the parser kept aside (the app still needs them): what
    ``natsfast.encode_headers`` writes for the dict of all of them, built
    as text at once.
    """
    special = req.special
    incoming = special.get("traceparent")
    tp = req.traceparent = (
        codec.next_traceparent(incoming) if tracer is None else tracer.next_traceparent(incoming)
    )
    mesh = (
        f"Nm-Method: {req.method}\r\nNm-Target: {req.target}\r\nNm-Source: {source}\r\n"
        f"X-Request-Id: {rid}\r\ntraceparent: {tp}\r\n"
    )
    lines = 5
    ct = special.get("content-type")
    if ct is not None:
        mesh += f"content-type: {ct}\r\n"
        lines += 1
    key = special.get("idempotency-key")
    if key is not None:
        mesh += f"idempotency-key: {key}\r\n"
        lines += 1
    if mesh.count("\n") != lines or mesh.count("\r") != lines:
        # A value held CR or LF: blanked, as encode_headers does.
        pairs = [
            (codec.H_METHOD, req.method),
            (codec.H_TARGET, req.target),
            (codec.H_SOURCE, source),
            (codec.REQUEST_ID, rid),
            (codec.TRACEPARENT, tp),
            ("content-type", ct),
            ("idempotency-key", key),
        ]
        mesh = "".join(f"{k}: {v.translate(_NEWLINES)}\r\n" for k, v in pairs if v is not None)
    return f"NATS/1.0\r\n{codec.nats_lines(req.headers)}{mesh}".encode()
