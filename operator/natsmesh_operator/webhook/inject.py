"""Sidecar injection: what the mutating webhook adds to a Pod.

Pure functions over the Pod as a dict, so they are unit tested without a
cluster and the webhook handler only decides *whether* to inject.

The sidecar is a native Kubernetes sidecar: an init container with
``restartPolicy: Always``, so it starts before the app containers and stops
after them. It runs as a numeric non-root user with a read-only root
filesystem and no capabilities, and gets the NATS creds Secret mounted
read-only.
"""

from __future__ import annotations

import copy
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from natsmesh_sidecar import readiness

logger = logging.getLogger(__name__)

SIDECAR_NAME = "natsmesh-sidecar"
CREDS_VOLUME = "natsmesh-creds"
CREDS_DIR = "/var/run/natsmesh/creds"
CREDS_KEY = "user.creds"
OUTBOUND_PORT = 15001
ADMIN_PORT = 15020

#: Annotations a workload author sets on the pod template.
ANNOTATION_INJECT = "natsmesh.io/inject"
"""``"false"`` opts a pod out of injection."""
ANNOTATION_PROXY_ENV = "natsmesh.io/proxy-env"
"""``"true"`` sets ``HTTP_PROXY`` in the app containers to the sidecar."""
ANNOTATION_READY_CHECK = "natsmesh.io/ready-check"
"""The app readiness check the sidecar waits for before joining its queue
group: ``tcp``, ``none`` (a pod that serves nothing) or an HTTP path; without
it, derived from the app container's readinessProbe."""
#: Annotations the webhook writes.
ANNOTATION_INJECTED = "natsmesh.io/injected"
ANNOTATION_SERVICE = "natsmesh.io/service"
LABEL_INJECTED = "natsmesh.io/injected"
#: How long past the pod's grace period a sidecar told "stopping" waits for
#: its SIGTERM before it joins its queue group again.
PRESTOP_HOLD_MARGIN_SECONDS = 30

JsonDict = dict[str, Any]


@dataclass(frozen=True)
class InjectionSettings:
    """How the injected sidecar container looks; set by the chart's values."""

    image: str = "natsmesh/sidecar:0.1.0"
    """Sidecar image reference."""
    image_pull_policy: str = "IfNotPresent"
    """Kubernetes imagePullPolicy of the sidecar."""
    nats_url: str = "nats://nats.natsmesh-system.svc:4222"
    """NATS URL as seen from application pods."""
    cpu_request: str = "10m"
    """CPU request of the sidecar."""
    memory_request: str = "32Mi"
    """Memory request (the sidecar idles at ~27 MiB on kind, see the README)."""
    memory_limit: str = "64Mi"
    """Memory limit; leaves head room for bursts of large bodies."""
    run_as_user: int = 65532
    """Numeric non-root user of the sidecar."""
    ready_period_seconds: float = 1.0
    """Seconds between the sidecar's checks of a ready app."""
    ready_failure_threshold: int = 3
    """Failed checks in a row that take a replica out of its queue group
    (a readinessProbe's own failureThreshold wins)."""
    otlp_endpoint: str = ""
    """OTLP/HTTP collector base URL the sidecars export spans to; empty: no
    tracing (and nothing of it loaded in the sidecars)."""
    trace_sample_ratio: float = 1.0
    """Share of the traces starting at a sidecar that are sampled."""
    extra_env: Mapping[str, str] = field(default_factory=dict)
    """More ``NATSMESH_*`` settings for every sidecar (e.g. drain seconds)."""

    def tracing_env(self) -> dict[str, str]:
        """The sidecar's tracing settings; none at all while tracing is off."""
        if not self.otlp_endpoint:
            return {}
        return {
            "NATSMESH_OTLP_ENDPOINT": self.otlp_endpoint,
            "NATSMESH_TRACE_SAMPLE_RATIO": str(self.trace_sample_ratio),
        }


@dataclass(frozen=True)
class Target:
    """The NatsService a pod belongs to."""

    service: str
    namespace: str
    version: str
    port: int
    creds_secret: str
    receives: bool = True
    """Whether mesh traffic can reach the app: some caller is admitted or an
    event subscription delivers to it. A pure client receives nothing, so its
    sidecar has nothing to gate on the app's readiness."""
    protocol: str = "http"
    """How the sidecar calls the app (NatsService ``protocol``)."""


class InvalidInjection(ValueError):
    """The pod asks for something the sidecar cannot do; the pod is refused."""


def creds_secret_name(service: str) -> str:
    return f"natsmesh-{service}-creds"


def wants_injection(pod: Mapping[str, Any]) -> bool:
    """False when the pod opted out or already has the sidecar."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if str(annotations.get(ANNOTATION_INJECT, "")).lower() == "false":
        return False
    spec = pod.get("spec") or {}
    names = [c.get("name") for c in (spec.get("initContainers") or [])]
    return SIDECAR_NAME not in names


def readiness_env(
    pod: Mapping[str, Any], app_port: int, *, receives: bool = True
) -> dict[str, str]:
    """``NATSMESH_READY_*`` for the sidecar: what tells it the app can serve.

    The ``natsmesh.io/ready-check`` annotation if set; else ``none`` when the
    NatsService receives nothing over the mesh (it admits no caller and
    subscribes to nothing: a pure client, whose app may listen on no port at
    all; gating on a TCP connect kept such a pod from ever being Ready); else
    the readinessProbe
    of the app container (the one exposing ``app_port``, or the only one):
    ``httpGet`` becomes the same GET on loopback, ``tcpSocket`` a connect,
    with the probe's port, timeout and failure threshold (not its period: the
    sidecar checks every second, a probe's default is ten). ``exec`` and
    ``grpc`` probes, HTTPS and unresolvable ports leave the sidecar's default,
    a TCP connect to ``app_port``.
    """
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    override = annotations.get(ANNOTATION_READY_CHECK)
    if override is not None:
        value = str(override).strip()
        if re.fullmatch(readiness.CHECK_PATTERN, value) is None:
            raise InvalidInjection(
                f"annotation {ANNOTATION_READY_CHECK}={value!r} is not a readiness check:"
                " use tcp, none or an HTTP path such as /healthz"
            )
        return {"NATSMESH_READY_CHECK": value}
    if not receives:
        return {"NATSMESH_READY_CHECK": readiness.NONE}
    container = _app_container((pod.get("spec") or {}).get("containers") or [], app_port)
    probe = (container or {}).get("readinessProbe") or {}
    if "httpGet" in probe:
        get = probe["httpGet"] or {}
        path = str(get.get("path") or "/")
        if str(get.get("scheme") or "HTTP").upper() != "HTTP":
            check = readiness.TCP  # the sidecar speaks plain HTTP to its app
        elif re.fullmatch(readiness.CHECK_PATTERN, path) is None:
            return {}
        else:
            check = path
        port = _probe_port(get.get("port"), container or {})
    elif "tcpSocket" in probe:
        check = readiness.TCP
        port = _probe_port((probe["tcpSocket"] or {}).get("port"), container or {})
    else:
        return {}
    if port is None:
        return {}
    env = {"NATSMESH_READY_CHECK": check}
    if port != app_port:
        env["NATSMESH_READY_PORT"] = str(port)
    if isinstance(probe.get("timeoutSeconds"), int) and probe["timeoutSeconds"] > 0:
        env["NATSMESH_READY_TIMEOUT_SECONDS"] = str(probe["timeoutSeconds"])
    if isinstance(probe.get("failureThreshold"), int) and probe["failureThreshold"] > 0:
        env["NATSMESH_READY_FAILURE_THRESHOLD"] = str(probe["failureThreshold"])
    return env


def _app_container(containers: list[JsonDict], app_port: int) -> JsonDict | None:
    for c in containers:
        if any(p.get("containerPort") == app_port for p in c.get("ports") or []):
            return c
    return containers[0] if len(containers) == 1 else None


def _probe_port(port: object, container: Mapping[str, Any]) -> int | None:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port if 0 < port < 65536 else None
    if isinstance(port, str):
        if port.isdigit():
            return _probe_port(int(port), container)
        for p in container.get("ports") or []:
            if p.get("name") == port and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return None


def sidecar_container(
    target: Target, settings: InjectionSettings, pod_env: Mapping[str, str] | None = None
) -> JsonDict:
    env = {
        "NATSMESH_SERVICE": target.service,
        "NATSMESH_NAMESPACE": target.namespace,
        "NATSMESH_VERSION": target.version,
        "NATSMESH_NATS_URL": settings.nats_url,
        "NATSMESH_CREDS_FILE": f"{CREDS_DIR}/{CREDS_KEY}",
        "NATSMESH_APP_PORT": str(target.port),
        "NATSMESH_APP_PROTOCOL": target.protocol,
        "NATSMESH_LISTEN_PORT": str(OUTBOUND_PORT),
        "NATSMESH_ADMIN_PORT": str(ADMIN_PORT),
        "NATSMESH_READY_PERIOD_SECONDS": str(settings.ready_period_seconds),
        "NATSMESH_READY_FAILURE_THRESHOLD": str(settings.ready_failure_threshold),
        **settings.tracing_env(),
        **settings.extra_env,
        # The pod's own (its probe, its preStop token) is more specific than
        # an operator-wide setting.
        **(pod_env or {}),
    }
    probe_port = {"port": ADMIN_PORT}
    return {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "restartPolicy": "Always",
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "ports": [
            {"name": "mesh-outbound", "containerPort": OUTBOUND_PORT, "protocol": "TCP"},
            {"name": "mesh-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "startupProbe": {
            "httpGet": {"path": "/healthz", **probe_port},
            "periodSeconds": 1,
            "failureThreshold": 30,
        },
        "readinessProbe": {"httpGet": {"path": "/readyz", **probe_port}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", **probe_port}, "periodSeconds": 10},
        "resources": {
            "requests": {"cpu": settings.cpu_request, "memory": settings.memory_request},
            "limits": {"memory": settings.memory_limit},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": CREDS_VOLUME, "mountPath": CREDS_DIR, "readOnly": True}],
    }


def _with_proxy_env(container: JsonDict) -> JsonDict:
    container = copy.deepcopy(container)
    env = container.setdefault("env", [])
    present = {e.get("name") for e in env}
    proxy = f"http://127.0.0.1:{OUTBOUND_PORT}"
    for name, value in (
        ("HTTP_PROXY", proxy),
        ("http_proxy", proxy),
        ("NO_PROXY", "127.0.0.1,localhost"),
        ("no_proxy", "127.0.0.1,localhost"),
    ):
        if name not in present:
            env.append({"name": name, "value": value})
    return container


def _prestop_target(pod: Mapping[str, Any], target: Target) -> int | None:
    """Index of the app container to give the preStop hook, None for none.

    The hook (``GET /prestop`` on the sidecar's admin port) runs before the
    kubelet sends the app SIGTERM, and returns once the sidecar has left its
    queue group and the app has answered what it holds: a native sidecar is
    only told to stop after the app has exited, too late to stop requests
    reaching an app that closed its listener. None when nothing reaches the
    app over the mesh (a pure client), when no container is the app's, or
    when the app has a preStop of its own (there is one per container, and
    the author's wins: that pod relies on the sidecar's readiness check and
    the callers' retries instead).
    """
    if not target.receives:
        return None
    containers = (pod.get("spec") or {}).get("containers") or []
    app = _app_container(containers, target.port)
    if app is None or (app.get("lifecycle") or {}).get("preStop"):
        return None
    return next(i for i, c in enumerate(containers) if c is app)


def _with_prestop(container: JsonDict, token: str) -> JsonDict:
    container = copy.deepcopy(container)
    # ``lifecycle: null`` is as good as absent.
    container["lifecycle"] = {**(container.get("lifecycle") or {})}
    container["lifecycle"]["preStop"] = {
        "httpGet": {
            "path": readiness.PRESTOP_PATH,
            "port": ADMIN_PORT,
            # The admin port is open to the pod network (probes, scrapes): the
            # token (readable only by who can read the pod) keeps others out.
            "httpHeaders": [{"name": readiness.PRESTOP_HEADER, "value": token}],
        }
    }
    return container


def injection(
    pod: Mapping[str, Any],
    target: Target,
    settings: InjectionSettings,
    *,
    prestop_token: str | None = None,
) -> JsonDict:
    """The changed top-level parts of the pod: ``metadata.annotations`` and ``spec.*`` lists.

    :class:`InvalidInjection` when the pod's annotations ask for the impossible.

    Lists are returned whole (merge semantics replace lists), each built from
    the pod's own list plus our additions, so nothing of the author's is lost.
    ``prestop_token`` (a fresh random one when None) ties the app container's
    preStop hook to this pod's sidecar.
    """
    spec = pod.get("spec") or {}
    hooked = _prestop_target(pod, target)
    token = prestop_token or secrets.token_hex(16)
    prestop_env: dict[str, str] = {}
    if hooked is not None:
        grace = spec.get("terminationGracePeriodSeconds")
        grace = grace if isinstance(grace, int) and grace >= 0 else 30
        prestop_env = {
            "NATSMESH_PRESTOP_TOKEN": token,
            # The hook waits at most half the grace: the app keeps the rest.
            "NATSMESH_PRESTOP_WAIT_SECONDS": str(max(1, grace // 2)),
            "NATSMESH_PRESTOP_HOLD_SECONDS": str(grace + PRESTOP_HOLD_MARGIN_SECONDS),
        }
    metadata = pod.get("metadata") or {}
    annotations = dict(metadata.get("annotations") or {})
    annotations[ANNOTATION_INJECTED] = "true"
    annotations[ANNOTATION_SERVICE] = target.service
    # A label too, so a PodMonitor can select injected pods.
    labels = dict(metadata.get("labels") or {})
    labels[LABEL_INJECTED] = "true"

    init = [*copy.deepcopy(spec.get("initContainers") or [])]
    # Native sidecars start in order: ours goes first so that other init
    # containers can already reach the mesh.
    init.insert(
        0,
        sidecar_container(
            target,
            settings,
            {**readiness_env(pod, target.port, receives=target.receives), **prestop_env},
        ),
    )

    volumes = [v for v in copy.deepcopy(spec.get("volumes") or []) if v.get("name") != CREDS_VOLUME]
    volumes.append(
        {
            "name": CREDS_VOLUME,
            "secret": {"secretName": target.creds_secret, "defaultMode": 0o444},
        }
    )
    result: JsonDict = {
        "metadata": {"annotations": annotations, "labels": labels},
        "spec": {"initContainers": init, "volumes": volumes},
    }
    proxy_env = str(annotations.get(ANNOTATION_PROXY_ENV, "")).lower() == "true"
    if proxy_env or hooked is not None:
        # Each helper returns a copy of the container it changes.
        containers = list(spec.get("containers") or [])
        if proxy_env:
            containers = [_with_proxy_env(c) for c in containers]
        if hooked is not None:
            containers[hooked] = _with_prestop(containers[hooked], token)
        result["spec"]["containers"] = containers
    return result
