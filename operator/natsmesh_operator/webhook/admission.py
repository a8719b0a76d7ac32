"""Admission decisions: which NatsService a pod belongs to, and cross-resource checks.

Pure functions over parsed resources, called by :mod:`.server` with the
NatsServices of the request's namespace (read fresh from the API server, so
any replica answers the same, leader or not).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from natsmesh_operator.api import LabelSelector, NatsRoute, NatsService
from natsmesh_operator.webhook.inject import Target, creds_secret_name
from natsmesh_sidecar import subjects

logger = logging.getLogger(__name__)

NEVER_INJECTED = frozenset({"kube-system", "kube-public", "kube-node-lease"})


class AmbiguousOwner(ValueError):
    """More than one NatsService selects a pod: it may belong to none of them."""


def owner_of(pod_labels: Mapping[str, str], services: Sequence[NatsService]) -> NatsService | None:
    """The one NatsService selecting a pod, None if none does.

    Several is an error, not a choice: picking one (by name, say) would let
    whoever creates a resource that sorts first take over another service's
    pods and get its creds mounted. The validating webhook keeps selectors
    apart; this catches resources that got in while it was down.
    """
    matching = [s for s in services if s.spec.selector.matches(pod_labels)]
    if len(matching) > 1:
        names = ", ".join(sorted(repr(str(s.metadata.name)) for s in matching))
        raise AmbiguousOwner(
            f"the pod's labels are selected by several NatsServices ({names}); a pod "
            "can belong to one NatsService only: change the selectors or the labels"
        )
    return matching[0] if matching else None


def target_of(svc: NatsService) -> Target:
    return Target(
        service=svc.service_name,
        namespace=str(svc.metadata.namespace),
        version=svc.spec.version,
        port=svc.spec.port,
        protocol=svc.spec.protocol,
        creds_secret=creds_secret_name(str(svc.metadata.name)),
        receives=bool(
            svc.spec.allow_same_namespace
            or svc.spec.allowed_callers
            or svc.spec.events.subscriptions
        ),
    )


def _key_constraints(selector: LabelSelector) -> dict[str, list[tuple[str, frozenset[str]]]]:
    """Per label key, the (operator, values) a pod's label must meet; matchLabels as In."""
    out: dict[str, list[tuple[str, frozenset[str]]]] = {}
    for key, value in selector.match_labels.items():
        out.setdefault(key, []).append(("In", frozenset({value})))
    for req in selector.match_expressions:
        out.setdefault(req.key, []).append((req.operator, frozenset(req.values)))
    return out


def _satisfiable(constraints: Sequence[tuple[str, frozenset[str]]]) -> bool:
    """Whether one label (present with some value, or absent) meets all constraints."""
    ops = {op for op, _ in constraints}
    # Absent: allowed unless something demands presence.
    if not ops & {"In", "Exists"}:
        return True
    # Present: impossible if something demands absence; otherwise some value
    # must be in every In set and in no NotIn set. Without an In set the
    # values are unbounded, so a finite NotIn always leaves one.
    if "DoesNotExist" in ops:
        return False
    allowed: frozenset[str] | None = None
    for op, values in constraints:
        if op == "In":
            allowed = values if allowed is None else allowed & values
    if allowed is None:
        return True
    excluded: set[str] = set()
    for op, values in constraints:
        if op == "NotIn":
            excluded |= values
    return bool(allowed - excluded)


def selectors_overlap(a: LabelSelector, b: LabelSelector) -> bool:
    """Could one pod be selected by both? Exact, for matchLabels and every operator.

    Label keys are independent, so both selectors match some label set iff,
    key by key, their combined requirements can be met by one label (or by
    its absence).
    """
    ca, cb = _key_constraints(a), _key_constraints(b)
    return all(_satisfiable(ca.get(k, []) + cb.get(k, [])) for k in ca.keys() | cb.keys())


def claim_order(svc: NatsService) -> tuple[bool, str, str]:
    """Sorts the first claimant first, as the plan does: creation time, then uid.

    A resource without a creation time (the API server sets it before
    validating admission, but be safe) sorts last: it never outranks one
    that exists.
    """
    created = svc.metadata.creation_timestamp or ""
    return (not created, created, svc.metadata.uid or "")


def subject_owner(
    svc: NatsService, others: Sequence[NatsService], *, creating: bool = False
) -> NatsService | None:
    """The other NatsService that claimed ``svc``'s (service, version) first, if any.

    Creating, every existing claimant came first (creation times have
    one-second resolution, so comparing them would leave a claim made in
    the owner's second to chance). Updating, only an earlier claimant
    counts: when two got in while the webhook was down, the owner can
    still be edited; the later one only away from the subject.
    """
    claimants = [
        o
        for o in others
        if o.metadata.name != svc.metadata.name
        and o.service_name == svc.service_name
        and o.spec.version == svc.spec.version
        and (creating or claim_order(o) < claim_order(svc))
    ]
    return min(claimants, key=claim_order, default=None)


def claims_anew(svc: NatsService, old: Mapping[str, Any] | None) -> bool:
    """Whether ``svc`` makes a claim it did not hold: a create, or an update that
    moves it to another (service, version). Such a claim comes after every
    existing one, whatever the timestamps say."""
    if not old:
        return True
    try:
        before = NatsService.from_body(old)
    except ValueError:  # a stored object the models refuse: judge the update as new
        return True
    return (before.service_name, before.spec.version) != (svc.service_name, svc.spec.version)


def validate_service(
    svc: NatsService, others: Sequence[NatsService], *, creating: bool = False
) -> list[str]:
    """Reasons to refuse ``svc``: its subject is claimed, or its pods could be another's.

    A (service, version) belongs to the NatsService that claimed it first:
    a later one under another name (say ``aaa`` with ``spec.service:
    orders``) would otherwise contend for orders' requests. Overlap is
    decided from the selectors alone (no pods are listed or counted): a pod
    created later could match both just as well as one that exists now.
    """
    errors = []
    owner = subject_owner(svc, others, creating=creating)
    if owner is not None:
        subject = subjects.request_subject(
            str(owner.metadata.namespace), svc.service_name, svc.spec.version
        )
        errors.append(
            f"spec.service: version {svc.spec.version!r} of service {svc.service_name!r} "
            f"({subject}) is already claimed by NatsService {owner.metadata.name!r}; a "
            "(service, version) belongs to the NatsService that claimed it first: choose "
            "another spec.service or spec.version"
        )
    for other in others:
        if other.metadata.name == svc.metadata.name:
            continue
        if selectors_overlap(svc.spec.selector, other.spec.selector):
            errors.append(
                f"spec.selector overlaps NatsService {other.metadata.name!r}: a pod can "
                "belong to one NatsService only; add a label (e.g. version) that tells "
                "them apart"
            )
    return errors


def caller_warnings(svc: NatsService, others: Sequence[NatsService]) -> list[str]:
    """Same-namespace ``allowedCallers`` entries that name no NatsService (yet).

    Allowed, since the caller may come later, but said: an entry names a
    *resource*, and one that still holds a service name (the old meaning)
    admits nobody. Only this namespace is looked at; whether a resource
    exists elsewhere is that namespace's business (the callee's
    ``CallersResolved`` condition reports it after the pass).
    """
    namespace = str(svc.metadata.namespace or "")
    names = {str(o.metadata.name) for o in others} | {str(svc.metadata.name)}
    warnings = []
    for n, caller in enumerate(svc.spec.allowed_callers):
        if caller.namespace not in (None, namespace) or caller.name in names:
            continue
        serving = sorted(str(o.metadata.name) for o in others if o.service_name == caller.name)
        hint = (
            f" (NatsService {serving[0]!r} serves spec.service {caller.name!r}: "
            f"to admit it, write name: {serving[0]})"
            if serving
            else ""
        )
        warnings.append(
            f"spec.allowedCallers[{n}]: no NatsService {caller.name!r} in this namespace "
            f"yet, so the entry admits nobody until one exists; entries name NatsService "
            f"resources, not spec.service{hint}"
        )
    return warnings


def route_warnings(route: NatsRoute, services: Sequence[NatsService]) -> list[str]:
    """A route to a service that does not exist (yet) is allowed, with a warning."""
    versions = {s.spec.version for s in services if s.service_name == route.spec.service}
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
    code: int = 422,
    patch: list[dict[str, Any]] | None = None,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if not allowed:
        reason = "Invalid" if code == 422 else "InternalError"
        response["status"] = {"code": code, "reason": reason, "message": message}
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
