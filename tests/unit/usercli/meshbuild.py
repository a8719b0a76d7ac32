"""Builders of NatsService / NatsRoute models and snapshots for the usercli unit tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from natsmesh_operator.api import NatsRoute, NatsService
from natsmesh_operator.usercli.snapshot import InvalidResource, PodLabels, Snapshot

STAMP = "2026-01-01T00:00:00Z"


def svc(
    name: str,
    ns: str = "shop",
    *,
    labels: Mapping[str, str] | None = None,
    service: str | None = None,
    version: str = "v1",
    callers: Sequence[Mapping[str, str]] = (),
    same_namespace: bool = True,
    publishes: Sequence[str] = (),
    subscriptions: Sequence[Mapping[str, Any]] = (),
    endpoints: int | None = None,
    ready: tuple[str, str, str] | None = None,
    creds: bool | None = None,
    created: str | None = None,
) -> NatsService:
    conditions = []
    if ready is not None:
        conditions.append(_cond("Ready", *ready))
    if creds is not None:
        conditions.append(_cond("CredentialsReady", "True" if creds else "False", "Issued", ""))
    spec: dict[str, Any] = {
        "selector": {"matchLabels": dict(labels or {"app": name})},
        "port": 8080,
        "version": version,
        "allowSameNamespace": same_namespace,
        "allowedCallers": list(callers),
        "events": {
            "publishes": [{"topic": t} for t in publishes],
            "subscriptions": [{"path": "/e", **s} for s in subscriptions],
        },
    }
    if service is not None:
        spec["service"] = service
    status: dict[str, Any] = {"conditions": conditions}
    if endpoints is not None:
        status["endpoints"] = endpoints
    return NatsService.model_validate(
        {
            "metadata": {
                "name": name,
                "namespace": ns,
                "creationTimestamp": created or STAMP,
                "uid": f"uid-{ns}-{name}",
            },
            "spec": spec,
            "status": status,
        }
    )


def _cond(type_: str, status: str, reason: str, message: str) -> dict[str, str]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": STAMP,
    }


def route(
    name: str,
    service: str,
    rules: Sequence[Mapping[str, Any]],
    ns: str = "shop",
    *,
    ready: tuple[str, str, str] | None = None,
) -> NatsRoute:
    conditions = [] if ready is None else [_cond("Ready", *ready)]
    return NatsRoute.model_validate(
        {
            "metadata": {"name": name, "namespace": ns},
            "spec": {"service": service, "rules": list(rules)},
            "status": {"conditions": conditions},
        }
    )


def dest(*pairs: tuple[str, int]) -> list[dict[str, Any]]:
    return [{"version": v, "weight": w} for v, w in pairs]


def pods(ns: str, *labels: Mapping[str, str]) -> tuple[PodLabels, ...]:
    return tuple(PodLabels(ns, f"pod-{i}", dict(lab)) for i, lab in enumerate(labels))


def snapshot(
    services: Iterable[NatsService] = (),
    routes: Iterable[NatsRoute] = (),
    *,
    pods_by_ns: Mapping[str, tuple[PodLabels, ...]] | None = None,
    selected: Iterable[str] | None = None,
    invalid: Iterable[InvalidResource] = (),
    unreadable: Iterable[str] = (),
) -> Snapshot:
    return Snapshot(
        services=tuple(services),
        routes=tuple(routes),
        invalid=tuple(invalid),
        pods=dict(pods_by_ns or {}),
        selected=None if selected is None else frozenset(selected),
        unreadable=frozenset(unreadable),
    )
