"""Per-NatsService NetworkPolicies: the app's port reachable only from inside its pod.

``allowedCallers`` is enforced by NATS permissions, so a caller that skips
NATS and dials the app's pod IP would skip it too. Each NatsService gets a
NetworkPolicy selecting its pods that admits ingress only to the sidecar's
admin port (probes and metrics). The sidecar reaches the app over
127.0.0.1, which NetworkPolicies never filter, so mesh traffic is untouched.

Like the creds Secrets, the policies are owned by their NatsService and kept
in sync by every mesh pass: a policy deleted or edited by hand comes back on
the next pass, one whose NatsService is gone is deleted (the garbage
collector would do it too, where one runs). Only policies the operator made
-- our label *and* a NatsService as controller -- are ever changed or
deleted, so a tenant's own policies are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import LabelSelector, LabelSelectorRequirement, ObjectMeta
from lightkube.models.networking_v1 import (
    NetworkPolicyIngressRule,
    NetworkPolicyPort,
    NetworkPolicySpec,
)
from lightkube.resources.networking_v1 import NetworkPolicy

from natsmesh_operator.api import NatsService
from natsmesh_operator.handlers import kube
from natsmesh_operator.watched import Watched
from natsmesh_operator.webhook.inject import ADMIN_PORT

logger = logging.getLogger(__name__)

LABEL_APP_POLICY = "natsmesh.io/app-policy"
"""On every per-NatsService NetworkPolicy (value ``true``): how they are listed."""


def policy_name(resource: str) -> str:
    """The NetworkPolicy of NatsService ``resource`` (next to ``natsmesh-<name>-creds``)."""
    return f"natsmesh-{resource}-app"


def desired_spec(svc: NatsService) -> dict[str, Any]:
    """The policy's spec as the API server returns it (so it can be compared)."""
    selector: dict[str, Any] = {}
    if svc.spec.selector.match_labels:
        selector["matchLabels"] = dict(svc.spec.selector.match_labels)
    if svc.spec.selector.match_expressions:
        selector["matchExpressions"] = [
            {
                "key": r.key,
                "operator": r.operator,
                **({"values": list(r.values)} if r.values else {}),
            }
            for r in svc.spec.selector.match_expressions
        ]
    return {
        "podSelector": selector,
        # Ingress only: the sidecar must still dial NATS, and egress rules
        # would need the NATS Service's address, which is not ours to know.
        "policyTypes": ["Ingress"],
        # No `from`: any source, but only the admin port (kubelet probes come
        # from the node and pass anyway; Prometheus scrapes it). The app's
        # port is left out, so only the pod itself (loopback) reaches it.
        "ingress": [{"ports": [{"port": ADMIN_PORT, "protocol": "TCP"}]}],
    }


def _policy(svc: NatsService, body: Mapping[str, Any]) -> NetworkPolicy:
    spec = desired_spec(svc)
    sel = spec["podSelector"]
    return NetworkPolicy(
        metadata=ObjectMeta(
            name=policy_name(str(svc.metadata.name)),
            namespace=str(svc.metadata.namespace),
            labels={
                kube.LABEL_MANAGED: "natsmesh",
                LABEL_APP_POLICY: "true",
                kube.LABEL_SERVICE: str(svc.metadata.name),
            },
            ownerReferences=[kube.owner_reference(body)],
        ),
        spec=NetworkPolicySpec(
            podSelector=LabelSelector(
                matchLabels=sel.get("matchLabels"),
                matchExpressions=[
                    LabelSelectorRequirement(
                        key=r["key"], operator=r["operator"], values=r.get("values")
                    )
                    for r in sel.get("matchExpressions", [])
                ]
                or None,
            ),
            policyTypes=spec["policyTypes"],
            ingress=[
                NetworkPolicyIngressRule(ports=[NetworkPolicyPort(port=ADMIN_PORT, protocol="TCP")])
            ],
        ),
    )


def _ours(policy: NetworkPolicy) -> bool:
    meta = policy.metadata
    if meta is None:
        return False
    labels = meta.labels or {}
    return labels.get(LABEL_APP_POLICY) == "true" and kube.controlled_by_natsservice(policy)


def _current_spec(policy: NetworkPolicy) -> dict[str, Any]:
    spec: dict[str, Any] = policy.spec.to_dict() if policy.spec is not None else {}
    return spec


@dataclass(frozen=True)
class PolicyReport:
    """What a sync did; errors are per NatsService (``namespace/name``) and never raise."""

    written: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    errors: Mapping[tuple[str, str], str] = field(default_factory=dict)


async def sync(
    client: AsyncClient,
    services: Iterable[tuple[NatsService, Mapping[str, Any]]],
    *,
    enabled: bool,
    watched: Watched,
) -> PolicyReport:
    """Make the managed NetworkPolicies match ``services`` (all of them, or none when
    not ``enabled``: switching the setting off removes the ones made before)."""
    existing: dict[tuple[str, str], NetworkPolicy] = {}
    labels = {LABEL_APP_POLICY: "true"}
    async for p in kube.list_watched(client, NetworkPolicy, watched, labels=labels):
        if p.metadata is not None and _ours(p):
            existing[(str(p.metadata.namespace), str(p.metadata.name))] = p
    wanted: dict[tuple[str, str], tuple[NatsService, Mapping[str, Any]]] = {}
    if enabled:
        for svc, body in services:
            ns = str(svc.metadata.namespace)
            wanted[(ns, policy_name(str(svc.metadata.name)))] = (svc, body)
    written: list[str] = []
    deleted: list[str] = []
    errors: dict[tuple[str, str], str] = {}
    for (ns, name), (svc, body) in sorted(wanted.items(), key=lambda kv: kv[0]):
        current = existing.get((ns, name))
        if current is not None and _current_spec(current) == desired_spec(svc):
            continue
        try:
            # Server-side apply with force: a hand edit of our fields is undone.
            await client.apply(_policy(svc, body), force=True)
        except ApiError as exc:
            logger.error("NetworkPolicy %s/%s: %s", ns, name, exc.status.message)
            errors[(ns, str(svc.metadata.name))] = str(exc.status.message)
            continue
        written.append(f"{ns}/{name}")
    for ns, name in sorted(existing.keys() - wanted.keys()):
        try:
            await client.delete(NetworkPolicy, name, namespace=ns)
        except ApiError as exc:
            if exc.status.code != 404:
                logger.error("deleting NetworkPolicy %s/%s: %s", ns, name, exc.status.message)
                continue
        deleted.append(f"{ns}/{name}")
    if written or deleted:
        logger.info("NetworkPolicies written %s, deleted %s", written, deleted)
    return PolicyReport(tuple(written), tuple(deleted), errors)
