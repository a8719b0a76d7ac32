"""Status conditions from a mesh pass, per the Kubernetes API conventions.

Pure functions: a pass result and the resource in, the new ``status.conditions``
out. ``lastTransitionTime`` only moves when a condition's status changes, so
a drift check that finds everything well writes nothing new.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.types import PatchType

from natsmesh_operator.api import NatsRoute, NatsService
from natsmesh_operator.handlers import bounded, kube
from natsmesh_operator.handlers.intents import service_name
from natsmesh_operator.wiring import grants
from natsmesh_operator.wiring.errors import Problem
from natsmesh_sidecar import subjects

if TYPE_CHECKING:
    from natsmesh_operator.handlers.mesh import PassResult

logger = logging.getLogger(__name__)

STATUS_CONCURRENCY = 16

JsonDict = dict[str, Any]

HELD_CONDITION = "PreviousCredentialsRevoked"
"""Shown only while False: the previous, wider user key is still valid (held)."""


@dataclass(frozen=True)
class Cond:
    type: str
    ok: bool
    reason: str
    message: str


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(
    previous: Sequence[Mapping[str, Any]], new: Iterable[Cond], generation: int
) -> list[JsonDict]:
    """New conditions, keeping ``lastTransitionTime`` of unchanged statuses."""
    old = {c.get("type"): c for c in previous}
    out: list[JsonDict] = []
    stamp = now()
    for c in new:
        status = "True" if c.ok else "False"
        before = old.get(c.type)
        since = (
            before.get("lastTransitionTime", stamp)
            if before is not None and before.get("status") == status
            else stamp
        )
        out.append(
            {
                "type": c.type,
                "status": status,
                "reason": c.reason,
                "message": c.message[:32000],
                "lastTransitionTime": since,
                "observedGeneration": generation,
            }
        )
    return out


def _problems(problems: Iterable[Problem], condition: str) -> list[Problem]:
    return [p for p in problems if p.condition == condition]


def service_conditions(result: PassResult, namespace: str, name: str) -> list[Cond]:
    """CredentialsReady, StreamsReady, RoutesReady, CallersResolved and
    PreviousCredentialsRevoked (both only while False) and the summary Ready."""
    if result.fatal:
        retry = Cond("Ready", False, "NatsUnavailable", result.fatal)
        return [
            Cond("CredentialsReady", False, "NatsUnavailable", result.fatal),
            Cond("StreamsReady", False, "NatsUnavailable", result.fatal),
            Cond("RoutesReady", False, "NatsUnavailable", result.fatal),
            retry,
        ]
    assert result.plan is not None
    problems = result.plan.problems_for("NatsService", namespace, name)
    errors = result.namespace_errors(namespace)
    creds = result.creds.get((namespace, name))
    conds = [
        Cond("CredentialsReady", creds.ok, creds.reason, creds.message)
        if creds
        else Cond("CredentialsReady", False, "Pending", "creds not issued yet"),
    ]
    stream_problems = _problems(problems, "StreamsReady")
    js_errors = [e for e in errors if "stream" in e or "consumer" in e or "jetstream" in e]
    if stream_problems or js_errors:
        why = "; ".join([p.message for p in stream_problems] + js_errors)
        conds.append(Cond("StreamsReady", False, "StreamsFailed", why))
    else:
        conds.append(Cond("StreamsReady", True, "StreamsApplied", "streams and consumers match"))
    route_problems = _problems(problems, "RoutesReady")
    if route_problems:
        conds.append(
            Cond("RoutesReady", False, route_problems[0].reason, route_problems[0].message)
        )
    else:
        conds.append(Cond("RoutesReady", True, "TableStored", "route table stored in KV"))
    policy_error = result.policy_errors.get((namespace, name))
    if policy_error:
        # Only while failing, so clusters with the policies switched off see
        # no extra condition.
        conds.append(Cond("NetworkPolicyReady", False, "NetworkPolicyFailed", policy_error))
    own = ("StreamsReady", "RoutesReady", grants.CONDITION)
    other = [p for p in problems if p.condition not in own]
    failing = [c for c in conds if not c.ok]
    callers = _problems(problems, grants.CONDITION)
    if callers:
        # Only while failing, and not in Ready: the service works; a grant to
        # a caller that does not exist (yet) just admits nobody.
        conds.append(Cond(grants.CONDITION, False, callers[0].reason, callers[0].message))
    held = result.held.get((namespace, name))
    if held is not None:
        # Not in Ready either: the service works on its new creds; this says
        # that a copy of the old ones still does too, and until when.
        conds.append(
            Cond(
                HELD_CONDITION,
                False,
                "RevocationHeld",
                f"the previous user {held.user} (re-issued with narrower permissions) stays "
                "valid until no connection uses it, at the latest until "
                f"{_rfc3339(held.until)}, so sidecars take the new creds up first",
            )
        )
    if other:
        conds.append(Cond("Ready", False, other[0].reason, "; ".join(p.message for p in other)))
    elif failing:
        conds.append(Cond("Ready", False, failing[0].reason, failing[0].message))
    elif errors:
        conds.append(Cond("Ready", False, "ApplyFailed", "; ".join(errors)))
    else:
        conds.append(Cond("Ready", True, "Reconciled", "NATS user, streams and routes applied"))
    return conds


def route_conditions(result: PassResult, namespace: str, name: str) -> list[Cond]:
    if result.fatal:
        return [Cond("Ready", False, "NatsUnavailable", result.fatal)]
    assert result.plan is not None
    problems = result.plan.problems_for("NatsRoute", namespace, name)
    if problems:
        return [Cond("Ready", False, problems[0].reason, "; ".join(p.message for p in problems))]
    errors = result.namespace_errors(namespace)
    if errors:
        return [Cond("Ready", False, "ApplyFailed", "; ".join(errors))]
    return [Cond("Ready", True, "Compiled", "compiled into the callers' route tables")]


def _same(conditions: Sequence[Mapping[str, Any]], previous: Sequence[Mapping[str, Any]]) -> bool:
    def key(cs: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted(
            (
                c.get("type"),
                c.get("status"),
                c.get("reason"),
                c.get("message"),
                c.get("observedGeneration"),
            )
            for c in cs
        )

    return key(conditions) == key(previous)


def _changes(
    current: Mapping[str, Any], now: list[Cond], generation: int, wanted: dict[str, Any]
) -> dict[str, Any]:
    """The status fields that differ from ``current`` ({} when nothing changed)."""
    previous = current.get("conditions") or []
    conditions = merge(previous, now, generation)
    wanted = {**wanted, "observedGeneration": generation}
    changed = {k: v for k, v in wanted.items() if current.get(k) != v}
    if not _same(conditions, previous):
        changed["conditions"] = conditions
    return changed


def service_status(
    result: PassResult, svc: NatsService, current: Mapping[str, Any]
) -> dict[str, Any]:
    """The status fields to write, or {} when nothing changed."""
    ns, name = str(svc.metadata.namespace), str(svc.metadata.name)
    subject = subjects.request_subject(ns, service_name(svc), svc.spec.version)
    wanted: dict[str, Any] = {"subject": subject}
    creds = result.creds.get((ns, name))
    if creds is not None and creds.user:
        wanted["user"] = creds.user
        if creds.expires:
            wanted["credentialsExpire"] = _rfc3339(creds.expires)
    return _changes(
        current,
        service_conditions(result, ns, name),
        int(svc.metadata.generation or 0),
        wanted,
    )


def _rfc3339(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def route_status(
    result: PassResult, route: NatsRoute, current: Mapping[str, Any]
) -> dict[str, Any]:
    """The status fields to write, or {} when nothing changed."""
    ns, name = str(route.metadata.namespace), str(route.metadata.name)
    return _changes(
        current,
        route_conditions(result, ns, name),
        int(route.metadata.generation or 0),
        {"ruleCount": len(route.spec.rules)},
    )


async def write_all(
    client: AsyncClient,
    result: PassResult,
    services: Sequence[tuple[NatsService, Mapping[str, Any]]],
    routes: Sequence[tuple[NatsRoute, Mapping[str, Any]]],
) -> int:
    """Patch the status of every resource whose status changed; returns how many."""
    todo: list[tuple[Any, str, str, dict[str, Any]]] = []
    kinds: list[tuple[Any, Any, Sequence[tuple[Any, Mapping[str, Any]]]]] = [
        (kube.NatsServiceRes.Status, service_status, services),
        (kube.NatsRouteRes.Status, route_status, routes),
    ]
    for res, status_of, items in kinds:
        for obj, body in items:
            fields = status_of(result, obj, body.get("status") or {})
            if fields:
                todo.append((res, str(obj.metadata.name), str(obj.metadata.namespace), fields))

    # Concurrent but bounded: a pass can change hundreds of statuses at once.
    async def write(item: tuple[Any, str, str, dict[str, Any]]) -> bool:
        res, name, namespace, fields = item
        try:
            await client.patch(
                res, name, {"status": fields}, namespace=namespace, patch_type=PatchType.MERGE
            )
            return True
        except ApiError as exc:
            if exc.status.code != 404:  # deleted meanwhile: nothing to report on
                logger.warning("writing status of %s/%s failed: %s", namespace, name, exc)
            return False

    return sum(await bounded.each(todo, write, STATUS_CONCURRENCY))


async def write_invalid(client: AsyncClient, invalid: Sequence[kube.Invalid]) -> int:
    """``Ready=False, reason Invalid`` on each resource the pass had to leave out."""
    written = 0
    for item in invalid:
        meta = item.body.get("metadata", {})
        res = kube.NatsServiceRes if item.kind == "NatsService" else kube.NatsRouteRes
        current = item.body.get("status") or {}
        cond = Cond("Ready", False, "Invalid", f"left out of the mesh: {item.error}")
        fields = _changes(current, [cond], int(meta.get("generation") or 0), {})
        if not fields:
            continue
        try:
            await client.patch(
                res.Status,
                str(meta.get("name")),
                {"status": fields},
                namespace=str(meta.get("namespace")),
                patch_type=PatchType.MERGE,
            )
            written += 1
        except ApiError as exc:
            logger.warning("status of invalid %s %s: %s", item.kind, meta.get("name"), exc)
    return written
