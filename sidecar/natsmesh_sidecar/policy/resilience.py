"""Traffic policy decisions: rule match, weighted split, retries, circuit breaker, faults.

Everything here is pure (time and randomness are passed in) so it is unit tested
without servers; :mod:`natsmesh_sidecar.calls.outbound` applies the decisions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from natsmesh_sidecar.wire import CircuitBreaker, Fault, Match, Retries, Rule, WeightedDestination

logger = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

NO_RESPONDERS = "noResponders"
TIMEOUT = "timeout"
#: A callee's 502 whose app refused the connection (``Nm-Undelivered``): the
#: request reached no app, as with no responders.
UNDELIVERED = "undelivered"
#: Outcomes of the caller's own side (natsfast/outbound names): its NATS
#: connection down or reconnecting, the server refusing its publish, a body
#: over max_payload. Never retried, and they say nothing about the callee.
UNAVAILABLE = "unavailable"
VIOLATION = "permission_violation"
TOO_LARGE = "too_large"
#: The client went away (an HTTP/2 stream reset, a gRPC cancel) before the answer.
CANCELLED = "cancelled"
CALLER_SIDE = frozenset({UNAVAILABLE, VIOLATION, TOO_LARGE, CANCELLED})


def matches(match: Match, method: str, path: str, headers: Mapping[str, str]) -> bool:
    """Whether a request fits a rule's match; header names in ``headers`` are lower-case."""
    if match.methods and method not in match.methods:
        return False
    if not path.startswith(match.path_prefix):
        return False
    return all(headers.get(name) == value for name, value in match.headers.items())


def select_rule(
    rules: Sequence[Rule], method: str, path: str, headers: Mapping[str, str]
) -> Rule | None:
    for rule in rules:
        if matches(rule.match, method, path, headers):
            return rule
    return None


def pick_destination(
    destinations: Sequence[WeightedDestination], r: float
) -> WeightedDestination | None:
    """Weighted choice with ``r`` uniform in [0, 1); None when all weights are 0."""
    if len(destinations) == 1:
        return destinations[0] if destinations[0].weight > 0 else None
    total = sum(d.weight for d in destinations)
    if total <= 0:
        return None
    point = r * total
    acc = 0.0
    for d in destinations:
        acc += d.weight
        if point < acc:
            return d
    return destinations[-1]


def is_idempotent(method: str) -> bool:
    return method in IDEMPOTENT_METHODS


def retryable(outcome: str | int, retries: Retries, method: str) -> bool:
    """Whether an attempt's outcome (status code or ``timeout``/``noResponders``) may be retried."""
    if retries.attempts <= 0:
        return False
    if outcome == UNDELIVERED:
        outcome = NO_RESPONDERS
    # A request that reached the app may have acted; no responders means it
    # never reached anyone, so that one is always safe to repeat.
    if not retries.retry_non_idempotent and not is_idempotent(method) and outcome != NO_RESPONDERS:
        return False
    if isinstance(outcome, str):
        return outcome in retries.retry_on
    if "5xx" in retries.retry_on and 500 <= outcome <= 599:
        return True
    return str(outcome) in retries.retry_on


def retryable_grpc(outcome: str | int, status: int | None, retries: Retries) -> bool:
    """Whether a gRPC call's try may be retried (its request is held whole and
    nothing of its response reached the client: the caller checks that).

    ``outcome`` is the mesh's (as for :func:`retryable`), ``status`` the gRPC
    status the client would get (None: nothing to retry, e.g. the client
    left). Nobody having heard the call (no responders, a replica's app
    refusing the connection) is retried as for any method when
    ``noResponders`` is in ``retryOn``; anything else only for the statuses
    the rule lists (``grpc_retry_on``): listing them says the rule's methods
    are safe to call twice, which an HTTP method says for HTTP (every gRPC
    call is a POST).
    """
    if retries.attempts <= 0 or status is None or outcome in CALLER_SIDE:
        return False
    if outcome in (NO_RESPONDERS, UNDELIVERED) and NO_RESPONDERS in retries.retry_on:
        return True
    return status in retries.grpc_retry_on


def backoff_seconds(attempt: int, retries: Retries, r: float) -> float:
    """Exponential backoff with jitter for retry number ``attempt`` (0-based)."""
    base = retries.backoff_base_ms * (2**attempt)
    capped = min(float(retries.backoff_max_ms), float(base))
    # Half fixed, half jitter: keeps a floor yet spreads synchronized retries.
    return capped * (0.5 + 0.5 * r) / 1000.0


def fault_decision(fault: Fault | None, r_delay: float, r_abort: float) -> tuple[float, int | None]:
    """(delay seconds, abort status or None) for one request."""
    if fault is None:
        return 0.0, None
    delay = 0.0
    if fault.delay is not None and r_delay * 100 < fault.delay.percent:
        delay = fault.delay.delay_ms / 1000.0
    abort = None
    if fault.abort is not None and r_abort * 100 < fault.abort.percent:
        abort = fault.abort.status
    return delay, abort


CLOSED = 0
OPEN = 1
HALF_OPEN = 2
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}


class Breaker:
    """Circuit breaker of one destination subject: closed, open, half-open.

    ``consecutive_failures`` failed requests in a row open it for ``open_ms``;
    then up to ``half_open_probes`` requests go through; a probe's success
    closes it, a failure opens it again. It hears each request once, with its
    final outcome after retries (:func:`verdict`), never each attempt.
    """

    __slots__ = ("config", "failures", "opened_at", "probes", "state")

    def __init__(self, config: CircuitBreaker) -> None:
        self.config = config
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probes = 0

    def allow(self, now: float) -> bool:
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if now - self.opened_at < self.config.open_ms / 1000.0:
                return False
            self.state = HALF_OPEN
            self.probes = 0
        if self.probes < self.config.half_open_probes:
            self.probes += 1
            return True
        return False

    def state_at(self, now: float) -> int:
        """The state a call arriving at ``now`` would find. An open circuit past
        ``open_ms`` lets the next call probe: half-open, though no call came to
        move it there (the metric must not say open forever once callers stop)."""
        if self.state == OPEN and now - self.opened_at >= self.config.open_ms / 1000.0:
            return HALF_OPEN
        return self.state

    def retry_after(self, now: float) -> int:
        """Whole seconds until a probe may go through (at least 1)."""
        left = self.config.open_ms / 1000.0 - (now - self.opened_at)
        return max(1, int(left + 0.999))

    def record(self, ok: bool | None, now: float) -> None:
        """One request's :func:`verdict`; None gives back a half-open probe unjudged."""
        if ok is None:
            if self.state == HALF_OPEN and self.probes > 0:
                self.probes -= 1
            return
        if ok:
            self.failures = 0
            if self.state != CLOSED:
                logger.info("circuit closed")
            self.state = CLOSED
            return
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.config.consecutive_failures:
            if self.state != OPEN:
                logger.warning("circuit opened after %d failed requests", self.failures)
            self.state = OPEN
            self.opened_at = now
            self.probes = 0


def verdict(outcome: str | int) -> bool | None:
    """What a request's final outcome (after its retries) says about the callee.

    False (a failure): a 5xx answered on the callee's side, by its app or by
    its sidecar (``app_unreachable`` 502 when the app dropped or garbled a
    call, ``app_timeout`` 504, ``overloaded`` 503), or no answer within the
    timeout. True: any other status. None (not counted): the caller's own
    side (:data:`CALLER_SIDE`); no responders -- nobody is subscribed (a
    rollout between replicas, a service scaled to zero): that is the mesh,
    it already fails fast, and no instance is there to protect; and
    :data:`UNDELIVERED` -- one replica's app refused the connection (it is
    starting, or dying until its sidecar leaves the queue group): counted,
    one replica's restart opened the whole service's circuit.
    """
    if isinstance(outcome, int):
        return outcome < 500
    if outcome == TIMEOUT:
        return False
    return None
