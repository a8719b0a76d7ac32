"""Pure policy: rule match, weighted split, retries, backoff, breaker, faults.

On the table types the hot path uses (natsmesh_sidecar.wire, no pydantic).
"""

from __future__ import annotations

import dataclasses

import pytest

from natsmesh_sidecar.policy import resilience as r
from natsmesh_sidecar.wire import (
    CircuitBreaker,
    Fault,
    FaultAbort,
    FaultDelay,
    Match,
    Retries,
    Rule,
    WeightedDestination,
)

pytestmark = pytest.mark.unit


def wd(version: str, weight: int) -> WeightedDestination:
    return WeightedDestination(version=version, weight=weight, subject=f"mesh.ns.svc.{version}")


def test_select_rule_first_match_wins() -> None:
    rules = [
        Rule(
            name="api-post",
            match=Match(path_prefix="/api", methods=("POST",)),
            destinations=(wd("v1", 100),),
        ),
        Rule(name="beta", match=Match(headers={"x-beta": "1"}), destinations=(wd("v2", 100),)),
        Rule(name="default", destinations=(wd("v1", 100),)),
    ]

    def selected(method: str, path: str, headers: dict[str, str]) -> str | None:
        rule = r.select_rule(rules, method, path, headers)
        return None if rule is None else rule.name

    assert selected("POST", "/api/x", {}) == "api-post"
    assert selected("GET", "/api/x", {"x-beta": "1"}) == "beta"
    assert selected("GET", "/api/x", {}) == "default"
    assert r.select_rule(rules[:1], "GET", "/", {}) is None


def test_weighted_pick() -> None:
    ds = [wd("v1", 80), wd("v2", 20)]

    def picked(x: float) -> str | None:
        d = r.pick_destination(ds, x)
        return None if d is None else d.version

    assert picked(0.0) == "v1"
    assert picked(0.79) == "v1"
    assert picked(0.8) == "v2"
    assert picked(0.999) == "v2"
    assert r.pick_destination([wd("v1", 0)], 0.5) is None
    assert r.pick_destination([wd("v1", 0), wd("v2", 0)], 0.5) is None


def test_retryable_rules() -> None:
    rt = Retries(attempts=2, retry_on=("timeout", "noResponders", "5xx", "429"))
    assert r.retryable("timeout", rt, "GET")
    assert r.retryable(503, rt, "GET")
    assert r.retryable(429, rt, "GET")
    assert not r.retryable(404, rt, "GET")
    assert not r.retryable("timeout", rt, "POST")
    assert r.retryable("noResponders", rt, "POST")  # never reached an app
    assert r.retryable("timeout", dataclasses.replace(rt, retry_non_idempotent=True), "POST")
    assert not r.retryable("timeout", Retries(attempts=0), "GET")


def test_backoff_grows_and_caps() -> None:
    rt = Retries(attempts=5, backoff_base_ms=10, backoff_max_ms=50)
    assert r.backoff_seconds(0, rt, 1.0) == pytest.approx(0.010)
    assert r.backoff_seconds(1, rt, 1.0) == pytest.approx(0.020)
    assert r.backoff_seconds(5, rt, 1.0) == pytest.approx(0.050)
    assert r.backoff_seconds(1, rt, 0.0) == pytest.approx(0.010)


def test_breaker_cycle() -> None:
    b = r.Breaker(CircuitBreaker(consecutive_failures=2, open_ms=1000, half_open_probes=1))
    assert b.allow(0.0)
    b.record(False, 0.0)
    assert b.state == r.CLOSED
    b.record(False, 0.1)
    assert b.state == r.OPEN
    assert not b.allow(0.5)
    assert b.retry_after(0.5) == 1
    assert b.allow(1.2)  # half-open probe
    assert b.state == r.HALF_OPEN
    assert not b.allow(1.2)  # only one probe
    b.record(False, 1.3)
    assert b.state == r.OPEN
    assert b.allow(2.4)
    b.record(True, 2.5)
    assert b.state == r.CLOSED
    assert b.allow(2.5)


def test_state_at_says_half_open_once_an_idle_open_circuit_would_let_a_probe_through() -> None:
    b = r.Breaker(CircuitBreaker(consecutive_failures=1, open_ms=1000))
    assert b.state_at(0.0) == r.CLOSED
    b.record(False, 0.0)
    assert b.state_at(0.9) == r.OPEN
    # No call came: the stored state is still open, a call now would probe.
    assert b.state_at(1.0) == r.HALF_OPEN
    assert b.state == r.OPEN
    assert b.allow(1.0)
    b.record(False, 1.1)
    assert b.state_at(1.2) == r.OPEN


def test_fault_decision() -> None:
    f = Fault(delay=FaultDelay(delay_ms=100, percent=50), abort=FaultAbort(status=503, percent=10))
    assert r.fault_decision(f, 0.2, 0.05) == (0.1, 503)
    assert r.fault_decision(f, 0.7, 0.5) == (0.0, None)
    assert r.fault_decision(None, 0.0, 0.0) == (0.0, None)


def test_verdict_counts_the_callee_not_the_caller_or_the_mesh() -> None:
    # The callee's side: its app's 5xx, its sidecar's 502/503/504, no answer in time.
    for failing in (500, 502, 503, 504, r.TIMEOUT):
        assert r.verdict(failing) is False, failing
    for healthy in (200, 204, 301, 404, 429):
        assert r.verdict(healthy) is True, healthy
    # The caller's own connection or request, and nobody subscribed: not counted.
    for neutral in (r.UNAVAILABLE, r.VIOLATION, r.TOO_LARGE, r.NO_RESPONDERS, r.UNDELIVERED):
        assert r.verdict(neutral) is None, neutral


def test_uncounted_outcomes_neither_open_nor_reset_the_circuit() -> None:
    b = r.Breaker(CircuitBreaker(consecutive_failures=2, open_ms=1000))
    b.record(r.verdict(503), 0.0)
    for _ in range(50):
        b.record(r.verdict(r.UNAVAILABLE), 0.1)
        b.record(r.verdict(r.NO_RESPONDERS), 0.1)
    assert b.state == r.CLOSED
    assert b.failures == 1
    b.record(r.verdict(r.TIMEOUT), 0.2)
    assert b.state == r.OPEN


def test_uncounted_probe_is_given_back() -> None:
    b = r.Breaker(CircuitBreaker(consecutive_failures=1, open_ms=1000, half_open_probes=1))
    b.record(False, 0.0)
    assert b.allow(1.5)
    assert not b.allow(1.5)
    # The probe met our own reconnect: it judged nothing, so another may go.
    b.record(None, 1.6)
    assert b.state == r.HALF_OPEN
    assert b.allow(1.7)
    b.record(True, 1.8)
    assert b.state == r.CLOSED


def test_a_call_no_app_received_is_retried_like_no_responders_whatever_the_method() -> None:
    rt = Retries(attempts=2)  # default retryOn: noResponders, timeout
    assert r.retryable(r.UNDELIVERED, rt, "POST")
    assert not r.retryable(502, rt, "GET")
    assert not r.retryable(r.UNDELIVERED, Retries(attempts=2, retry_on=("5xx",)), "GET")
    assert not r.retryable(r.UNDELIVERED, Retries(attempts=0), "GET")


GRPC = Retries(attempts=2, grpc_retry_on=(14,))


@pytest.mark.parametrize(
    ("outcome", "status", "retries", "expected"),
    [
        # The app's (or the mesh's) UNAVAILABLE, listed: retried.
        (200, 14, GRPC, True),
        (503, 14, GRPC, True),
        # Listed statuses only: the app's INVALID_ARGUMENT is its answer.
        (200, 3, GRPC, False),
        (r.TIMEOUT, 4, GRPC, False),
        (r.TIMEOUT, 4, Retries(attempts=2, grpc_retry_on=(4, 14)), True),
        # Nobody heard the call: as for HTTP, whatever the statuses, with noResponders.
        (r.NO_RESPONDERS, 14, Retries(attempts=2), True),
        (r.UNDELIVERED, 14, Retries(attempts=2), True),
        (r.NO_RESPONDERS, 14, Retries(attempts=2, retry_on=("timeout",)), False),
        # Not opted in: a rule with retries but no gRPC status retries no answer.
        (200, 14, Retries(attempts=2), False),
        # No retries at all, a committed response (no status), the caller's own side.
        (200, 14, Retries(attempts=0, grpc_retry_on=(14,)), False),
        (200, None, GRPC, False),
        (r.UNAVAILABLE, 14, GRPC, False),
        (r.CANCELLED, 1, Retries(attempts=2, grpc_retry_on=(1, 14)), False),
    ],
)
def test_retryable_grpc(
    outcome: str | int, status: int | None, retries: Retries, expected: bool
) -> None:
    assert r.retryable_grpc(outcome, status, retries) is expected
