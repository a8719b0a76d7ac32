"""Rollout restarts: existing workloads picked up (or dropped) by a NatsService.

Pods get the sidecar only when created, so when a NatsService starts or stops
selecting the pods of a Deployment or StatefulSet, the operator bumps an
annotation on its pod template (what ``kubectl rollout restart`` does) --
only for workloads that have a pod in the wrong state, so a resume or a
drift check never restarts anything twice. A workload annotated
``natsmesh.io/restart: "false"`` is left alone.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping

from lightkube import AsyncClient
from lightkube.resources.apps_v1 import Deployment, StatefulSet
from lightkube.resources.core_v1 import Namespace, Pod
from lightkube.types import PatchType

from natsmesh_operator.api import LabelSelector
from natsmesh_operator.metrics import METRICS
from natsmesh_operator.webhook.inject import ANNOTATION_INJECTED

logger = logging.getLogger(__name__)

ANNOTATION_RESTARTED = "natsmesh.io/restartedAt"
ANNOTATION_RESTART = "natsmesh.io/restart"
LABEL_INJECT = "natsmesh.io/inject"


def wants_restart(
    workload_annotations: Mapping[str, str],
    template_labels: Mapping[str, str],
    pod_injected: list[bool],
    selector: LabelSelector,
    *,
    injecting: bool,
) -> bool:
    """Pure decision: selected, not opted out, and some pod is in the wrong state."""
    if workload_annotations.get(ANNOTATION_RESTART, "").lower() == "false":
        return False
    if not selector.matches(template_labels):
        return False
    return any(injected != injecting for injected in pod_injected)


async def injection_enabled(kube: AsyncClient, namespace: str) -> bool:
    ns = await kube.get(Namespace, namespace)
    return ((ns.metadata.labels if ns.metadata else None) or {}).get(LABEL_INJECT) == "enabled"


async def _pods_injected(kube: AsyncClient, namespace: str, match: Mapping[str, str]) -> list[bool]:
    out = []
    async for pod in kube.list(Pod, namespace=namespace, labels=dict(match)):
        annotations = (pod.metadata.annotations if pod.metadata else None) or {}
        out.append(annotations.get(ANNOTATION_INJECTED) == "true")
    return out


async def restart_selected(
    kube: AsyncClient, namespace: str, selector: LabelSelector, *, injecting: bool
) -> list[str]:
    """Restart the selected workloads; returns ``Kind/name`` of each one restarted."""
    if not await injection_enabled(kube, namespace):
        return []
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    patch = {"spec": {"template": {"metadata": {"annotations": {ANNOTATION_RESTARTED: stamp}}}}}
    restarted: list[str] = []
    workloads: list[Deployment | StatefulSet] = [
        d async for d in kube.list(Deployment, namespace=namespace)
    ]
    workloads += [s async for s in kube.list(StatefulSet, namespace=namespace)]
    for wl in workloads:
        if wl.metadata is None or wl.spec is None:
            continue
        template = wl.spec.template.metadata
        match = wl.spec.selector.matchLabels or {}
        if not match:
            continue  # expression-only selectors: not worth a guess
        if not wants_restart(
            wl.metadata.annotations or {},
            (template.labels if template else None) or {},
            await _pods_injected(kube, namespace, match),
            selector,
            injecting=injecting,
        ):
            continue
        kind = type(wl)
        await kube.patch(
            kind, str(wl.metadata.name), patch, namespace=namespace, patch_type=PatchType.MERGE
        )
        METRICS.rollouts.labels(kind=kind.__name__).inc()
        restarted.append(f"{kind.__name__}/{wl.metadata.name}")
        logger.info(
            "restarted %s/%s/%s for sidecar %s",
            kind.__name__,
            namespace,
            wl.metadata.name,
            "injection" if injecting else "removal",
        )
    return restarted
