"""Finding an installed natsmesh: its operator Deployment and what it is configured with.

The chart names objects after the release, so nothing here guesses names:
the operator Deployment is found by its labels in the release namespace, and
the NATS URL, bootstrap Secret and watched namespaces are read from its
``NATSMESH_*`` variables (the ones :mod:`natsmesh_operator.settings` reads).
Flags override each; without a Deployment the operator's own defaults apply.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from lightkube import AsyncClient
from lightkube.resources.apps_v1 import Deployment

from natsmesh_operator.settings import NatsSettings
from natsmesh_operator.watched import Watched

log = logging.getLogger(__name__)

OPERATOR_LABELS = {
    "app.kubernetes.io/part-of": "natsmesh",
    "app.kubernetes.io/component": "operator",
}
DEFAULT_NAMESPACE = "natsmesh-system"


@dataclass(frozen=True)
class Release:
    namespace: str
    deployments: tuple[Deployment, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    """Plain ``value`` variables of the operator container (valueFrom is not resolved)."""

    @property
    def nats_url(self) -> str:
        return self.env.get("NATSMESH_NATS_URL", NatsSettings.url)

    @property
    def bootstrap_secret(self) -> str:
        return self.env.get("NATSMESH_BOOTSTRAP_SECRET", NatsSettings.bootstrap_secret)

    @property
    def watched(self) -> Watched:
        raw = self.env.get("NATSMESH_WATCH_NAMESPACES", "")
        return Watched(tuple(n.strip() for n in raw.split(",") if n.strip()))


def serving_secret(release: Release) -> str | None:
    """The Secret the operator mounts at its webhook cert directory, if it mounts one."""
    cert_dir = release.env.get("NATSMESH_WEBHOOK_CERT_DIR")
    if not cert_dir or not release.deployments:
        return None
    spec = release.deployments[0].spec
    pod = spec.template.spec if spec is not None and spec.template is not None else None
    if pod is None:
        return None
    mounted = {
        m.name
        for c in pod.containers or []
        for m in c.volumeMounts or []
        if m.mountPath.rstrip("/") == cert_dir.rstrip("/")
    }
    for volume in pod.volumes or []:
        if volume.name in mounted and volume.secret is not None and volume.secret.secretName:
            return str(volume.secret.secretName)
    return None


def operator_env(deployment: Deployment) -> dict[str, str]:
    """The ``NATSMESH_*`` values of the Deployment's operator container."""
    spec = deployment.spec
    pod = spec.template.spec if spec is not None and spec.template is not None else None
    if pod is None:
        return {}
    containers = sorted(pod.containers or [], key=lambda c: c.name != "operator")
    for container in containers[:1]:
        return {
            e.name: e.value
            for e in container.env or []
            if e.name.startswith("NATSMESH_") and e.value is not None
        }
    return {}


async def discover(client: AsyncClient, namespace: str) -> Release:
    deployments = [
        d async for d in client.list(Deployment, namespace=namespace, labels={**OPERATOR_LABELS})
    ]
    deployments.sort(key=lambda d: str(d.metadata.name if d.metadata else ""))
    env = operator_env(deployments[0]) if deployments else {}
    return Release(namespace, tuple(deployments), env)
