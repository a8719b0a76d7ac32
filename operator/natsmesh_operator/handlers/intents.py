"""Custom resources -> the wiring's Kubernetes-free intents.

The only place that knows both the CRD models and the wiring types: a CRD
field that is renamed or regrouped changes this file and nothing in wiring.
"""

from __future__ import annotations

from natsmesh_operator.api import NatsRoute, NatsService, parse_duration_ms
from natsmesh_operator.api import route as api_route
from natsmesh_operator.wiring import desired
from natsmesh_operator.wiring.routes import RouteDestination, RouteIntent, RouteRule
from natsmesh_sidecar import config as wire


def service_name(svc: NatsService) -> str:
    """The mesh service a NatsService serves (``spec.service`` or its own name)."""
    return svc.spec.service or str(svc.metadata.name)


def service_intent(svc: NatsService) -> desired.ServiceIntent:
    """One NatsService as the wiring sees it."""
    spec = svc.spec
    stream = desired.StreamSettings(
        retention=spec.events.stream.retention,
        max_age_ms=parse_duration_ms(spec.events.stream.max_age),
        replicas=spec.events.stream.replicas,
        storage=spec.events.stream.storage,
        max_bytes=spec.events.stream.max_bytes or -1,
        max_msgs=spec.events.stream.max_msgs or -1,
    )
    return desired.ServiceIntent(
        namespace=str(svc.metadata.namespace),
        name=service_name(svc),
        version=spec.version,
        allowed_callers=tuple(desired.CallerRef(c.name, c.namespace) for c in spec.allowed_callers),
        allow_same_namespace=spec.allow_same_namespace,
        publishes=tuple(desired.Publish(p.topic, stream) for p in spec.events.publishes),
        subscriptions=tuple(
            desired.Subscribe(
                topic=s.topic,
                service=s.service,
                path=s.path,
                namespace=s.namespace,
                delivery=s.delivery,
                max_deliver=s.effective_max_deliver,
                ack_wait_ms=s.ack_wait_ms,
                backoff_ms=tuple(s.backoff_ms),
            )
            for s in spec.events.subscriptions
        ),
        resource=str(svc.metadata.name),
        created=svc.metadata.creation_timestamp or "",
        uid=svc.metadata.uid or "",
    )


def _retries(r: api_route.Retries | None) -> wire.Retries:
    if r is None:
        return wire.Retries(attempts=0)
    return wire.Retries(
        attempts=r.attempts,
        per_try_timeout_ms=parse_duration_ms(r.per_try_timeout) if r.per_try_timeout else 0,
        retry_on=(*r.retry_on, *(str(code) for code in r.retry_on_codes)),
        backoff_base_ms=parse_duration_ms(r.backoff.base),
        backoff_max_ms=parse_duration_ms(r.backoff.max),
        retry_non_idempotent=r.retry_non_idempotent,
        grpc_retry_on=tuple(api_route.GRPC_RETRYABLE[name] for name in r.retry_on_grpc),
    )


def _fault(f: api_route.Fault | None) -> wire.Fault | None:
    if f is None:
        return None
    return wire.Fault(
        delay=wire.FaultDelay(
            delay_ms=parse_duration_ms(f.delay.fixed_delay), percent=f.delay.percent
        )
        if f.delay
        else None,
        abort=wire.FaultAbort(status=f.abort.http_status, percent=f.abort.percent)
        if f.abort
        else None,
    )


def _breaker(cb: api_route.CircuitBreaker | None) -> wire.CircuitBreaker | None:
    if cb is None:
        return None
    return wire.CircuitBreaker(
        consecutive_failures=cb.consecutive_failures,
        open_ms=parse_duration_ms(cb.open_duration),
        half_open_probes=cb.half_open_requests,
    )


def _stream(s: api_route.StreamSettings | None) -> wire.StreamPolicy | None:
    if s is None or (s.idle_timeout is None and s.window is None):
        return None
    return wire.StreamPolicy(
        idle_timeout_ms=parse_duration_ms(s.idle_timeout) if s.idle_timeout else 0,
        window=s.window or 0,
    )


def route_intent(route: NatsRoute) -> RouteIntent:
    rules = tuple(
        RouteRule(
            destinations=tuple(RouteDestination(d.version, d.weight) for d in rule.destinations),
            name=rule.name or f"rule-{i}",
            match=wire.Match(
                path_prefix=rule.match.path_prefix,
                methods=tuple(rule.match.methods),
                headers={k.lower(): v for k, v in rule.match.headers.items()},
            ),
            timeout_ms=rule.timeout_ms,
            retries=_retries(rule.retries),
            fault=_fault(rule.fault),
            circuit_breaker=_breaker(rule.circuit_breaker),
            max_body_bytes=rule.max_body_bytes or 0,
            stream=_stream(rule.stream),
        )
        for i, rule in enumerate(route.spec.rules)
    )
    return RouteIntent(
        namespace=str(route.metadata.namespace),
        service=route.spec.service,
        rules=rules,
        resource=str(route.metadata.name),
    )
