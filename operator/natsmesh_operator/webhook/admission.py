"""Admission decisions: which NatsService a pod belongs to, and cross-resource checks.

Pure functions over parsed resources, called by :mod:`.server` with the
NatsServices of the request's namespace (read fresh from the API server, so
any replica answers the same, leader or not).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

from natsmesh_operator.api import LabelSelector, NatsRoute, NatsService
from natsmesh_operator.handlers.intents import service_name
from natsmesh_operator.webhook.inject import Target, creds_secret_name

NEVER_INJECTED = frozenset({"kube-system", "kube-public", "kube-node-lease"})


def owner_of(pod_labels: Mapping[str, str], services: Sequence[NatsService]) -> NatsService | None:
    """The NatsService selecting a pod (the validating webhook keeps it unique)."""
    matching = [s for s in services if s.spec.selector.matches(pod_labels)]
    return sorted(matching, key=lambda s: str(s.metadata.name))[0] if matching else None


def target_of(svc: NatsService) -> Target:
    return Target(
        service=service_name(svc),
        namespace=str(svc.metadata.namespace),
        version=svc.spec.version,
        port=svc.spec.port,
        creds_secret=creds_secret_name(str(svc.metadata.name)),
    )


def _labels_only(selector: LabelSelector) -> dict[str, str] | None:
    return None if selector.match_expressions else dict(selector.match_labels)


def selectors_overlap(a: LabelSelector, b: LabelSelector) -> bool:
    """Could one pod be selected by both? Exact for matchLabels-only selectors.

    Two label sets can both be satisfied unless they demand different values
    for one key. With expressions we only say "overlap" for equal selectors,
    and leave the rest to the pod check (:func:`pods_selected_by_both`).
    """
    la, lb = _labels_only(a), _labels_only(b)
    if la is not None and lb is not None:
        return all(lb.get(k, v) == v for k, v in la.items())
    return a == b


def pods_selected_by_both(
    a: LabelSelector, b: LabelSelector, pods: Sequence[Mapping[str, str]]
) -> int:
    return sum(1 for labels in pods if a.matches(labels) and b.matches(labels))


def validate_service(
    svc: NatsService,
    others: Sequence[NatsService],
    pod_labels: Sequence[Mapping[str, str]],
) -> list[str]:
    """Reasons to refuse ``svc``: another NatsService already selects its pods."""
    errors = []
    for other in others:
        if other.metadata.name == svc.metadata.name:
            continue
        both = pods_selected_by_both(svc.spec.selector, other.spec.selector, pod_labels)
        if both or selectors_overlap(svc.spec.selector, other.spec.selector):
            where = f" ({both} existing pods match both)" if both else ""
            errors.append(
                f"spec.selector overlaps NatsService {other.metadata.name!r}{where}: a pod "
                "can belong to one NatsService only; add a label (e.g. version) that tells "
                "them apart"
            )
    return errors


def route_warnings(route: NatsRoute, services: Sequence[NatsService]) -> list[str]:
    """A route to a service that does not exist (yet) is allowed, with a warning."""
    versions = {s.spec.version for s in services if service_name(s) == route.spec.service}
    if not versions:
        return [
            f"spec.service: no NatsService serves {route.spec.service!r} in this namespace "
            "yet; the route applies once one does"
        ]
    missing = sorted(
        {d.version for r in route.spec.rules for d in r.destinations if d.weight} - versions
    )
    if missing:
        return [
            f"spec.rules: no NatsService serves version(s) {', '.join(missing)} of "
            f"{route.spec.service!r} yet; calls routed there get 503 until one does"
        ]
    return []


def review_response(
    uid: str,
    *,
    allowed: bool = True,
    message: str = "",
    patch: list[dict[str, Any]] | None = None,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if not allowed:
        response["status"] = {"code": 422, "reason": "Invalid", "message": message}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    if warnings:
        response["warnings"] = list(warnings)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def json_patch(changes: Mapping[str, Any]) -> list[dict[str, Any]]:
    """JSON Patch ops that set each changed top-level part (``add`` replaces too)."""
    ops: list[dict[str, Any]] = []
    for key, value in changes.get("metadata", {}).items():
        ops.append({"op": "add", "path": f"/metadata/{key}", "value": value})
    for key, value in changes.get("spec", {}).items():
        ops.append({"op": "add", "path": f"/spec/{key}", "value": value})
    return ops
