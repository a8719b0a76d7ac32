"""Operator settings: one dataclass per concern, read from ``NATSMESH_*`` variables.

The Helm chart sets these variables; the local test bed sets them the same
way, so the operator never has two configuration paths.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from natsmesh_operator.watched import Watched
from natsmesh_operator.webhook.inject import InjectionSettings


@dataclass(frozen=True)
class NatsSettings:
    """How the operator reaches NATS and where the bootstrap material lives."""

    url: str = "nats://127.0.0.1:4222"
    """NATS URL the operator connects to (as the system account's user); a
    comma-separated list names several servers of one cluster."""
    replicas: int = 1
    """Replicas of the mesh's own streams, the route bucket and the dead
    letters (``NATSMESH_NATS_REPLICAS``; the chart sets ``nats.replicas``):
    the NATS cluster's size, so one server's restart loses no route table.
    A bucket made with fewer is raised in place. See docs/architecture.md."""
    bootstrap_secret: str = "natsmesh-nats-bootstrap"  # noqa: S105 - a Secret name
    """Secret in the operator namespace made by ``natsmesh bootstrap``: the
    operator seed (signs account JWTs) and the system user's creds."""
    connect_timeout: float = 2.0
    """Seconds per connection attempt; a failure is reported in conditions."""


@dataclass(frozen=True)
class WebhookSettings:
    """The admission webhook server."""

    port: int = 9443
    """HTTPS port of the webhook server."""
    # All interfaces: the API server connects from outside the pod.
    addr: str = "0.0.0.0"
    """Listen address."""
    cert_dir: Path | None = None
    """Directory with ``tls.crt``, ``tls.key`` and ``ca.crt``; re-read on change."""
    self_register_url: str | None = None
    """Local test bed only: the operator writes its own webhook configurations
    with this URL as clientConfig (the chart writes them in a cluster)."""
    failure_policy: str = "Fail"
    """failurePolicy of self-registered configurations."""
    enabled: bool = True
    """Serve admission at all."""
    client_ca_file: Path | None = None
    """CA bundle of the client certificate the API server presents to webhooks
    (``NATSMESH_WEBHOOK_CLIENT_CA_FILE``). When set, a TLS client without a
    certificate signed by it is refused in the handshake: no forged
    AdmissionReview from a pod. Needs the API server's admission configuration
    to present one (see docs/security.md)."""
    client_names: tuple[str, ...] = ()
    """Accepted common names / DNS SANs of that certificate
    (``NATSMESH_WEBHOOK_CLIENT_NAMES``, comma-separated); empty: any it signed."""


@dataclass(frozen=True)
class ReconcileSettings:
    """Timing of reconciliation and drift repair."""

    drift_interval: float = 60.0
    """Seconds between drift checks (a pass that recreates what was changed
    or deleted by hand). The safety net: a deleted creds Secret, stream or
    consumer is noticed by a watch and repaired at once."""
    retry_delay: float = 10.0
    """Seconds before retrying after NATS or the API server failed; also the
    cap of the backoff (1, 2, 4 ... s) after a pass that failed in places."""
    endpoints_interval: float = 30.0
    """Seconds between each NatsService's timer: an endpoint count ($SRV.PING)
    and a drift check when the last pass is older than ``drift_interval``.
    The safety net: counts follow NATS connect/disconnect advisories."""
    api_connections: int = 32
    """Connections kopf may open to the API server when watching the whole
    cluster (``NATSMESH_API_CONNECTIONS``; 0: no bound). Requests beyond it
    wait for a free connection instead of opening one (each costs TLS
    buffers); three are held by kopf's watches."""


@dataclass(frozen=True)
class CredsSettings:
    """The NATS users the operator issues (one per NatsService)."""

    ttl_seconds: int = 24 * 3600
    """Lifetime of every user JWT (``NATSMESH_CREDS_TTL_SECONDS``, at least 300).
    Re-issued with the same key when a quarter of it is left; a copied creds
    file stops working at the latest when it expires."""
    max_control_line: int = 16384
    """The NATS servers' ``max_control_line`` (``NATSMESH_NATS_MAX_CONTROL_LINE``,
    set by the chart from the same value): a CONNECT carrying a longer JWT is
    refused, so the operator refuses to issue one (see :attr:`max_jwt_bytes`)."""
    revocation_grace_seconds: float = 90.0
    """A narrowing re-issue gives the service a new key; the old key stays
    valid until no server reports a connection with it, for at most this long
    (``NATSMESH_CREDS_REVOCATION_GRACE_SECONDS``): the time a kubelet may take
    to rewrite the mounted Secret (its sync period, a minute by default, plus
    its cache) and the sidecar to take the new creds up. 0 revokes at once,
    cutting the sidecars that still use it (see docs/security.md)."""

    @property
    def max_jwt_bytes(self) -> int:
        # The CONNECT line also carries the nonce signature (~90 bytes), the
        # client's name, version and options: leave 1 KiB for them.
        return self.max_control_line - 1024


@dataclass(frozen=True)
class NetworkSettings:
    """What the operator does at the pod-network level."""

    app_policy: bool = True
    """Give every NatsService a NetworkPolicy that admits ingress to its pods
    only on the sidecar's admin port (``NATSMESH_APP_NETWORK_POLICY``, chart
    value ``mesh.networkPolicy``), so the app's port is reachable only from
    inside the pod and ``allowedCallers`` cannot be skipped by dialling the
    pod IP. Takes effect only where the CNI enforces NetworkPolicies. Off:
    policies made earlier are deleted."""


@dataclass(frozen=True)
class OperatorSettings:
    namespace: str = "natsmesh-system"
    """The operator's own namespace: never injected, holds the bootstrap Secret."""
    peering: str | None = "natsmesh"
    """kopf peering name; None runs standalone (one replica, tests)."""
    peering_priority: int = 0
    """This replica's kopf peering priority (``NATSMESH_PEERING_PRIORITY``);
    the highest acts, the others stand by until its peering record goes away.
    Unset: a random one per process, because kopf pauses *every* replica when
    two share the highest priority (as two replicas of one Deployment would)."""
    metrics_port: int = 8080
    """Port of /metrics and /healthz."""
    log_format: str = "json"
    """``json`` or ``plain``."""
    watch_namespaces: tuple[str, ...] = ()
    """Namespace globs the operator manages (``NATSMESH_WATCH_NAMESPACES``,
    comma-separated); empty means every namespace. One operator per set of
    namespaces: two operators managing the same namespace would fight."""
    nats: NatsSettings = field(default_factory=NatsSettings)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    injection: InjectionSettings = field(default_factory=InjectionSettings)
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    creds: CredsSettings = field(default_factory=CredsSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)

    @property
    def watched(self) -> Watched:
        return Watched(self.watch_namespaces)

    def watches(self, namespace: str) -> bool:
        return self.watched(namespace)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        e = os.environ if env is None else env

        def get(name: str, default: str) -> str:
            return e.get(f"NATSMESH_{name}", default)

        nats_url = get("NATS_URL", NatsSettings.url)
        cert_dir = e.get("NATSMESH_WEBHOOK_CERT_DIR")
        client_ca = e.get("NATSMESH_WEBHOOK_CLIENT_CA_FILE")
        peering = get("PEERING", "natsmesh")
        return cls(
            namespace=get("OPERATOR_NAMESPACE", cls.namespace),
            peering=None if peering in ("", "none", "standalone") else peering,
            peering_priority=int(
                get("PEERING_PRIORITY", "") or secrets.randbelow(1_000_000_000) + 1
            ),
            metrics_port=int(get("METRICS_PORT", str(cls.metrics_port))),
            log_format=get("LOG_FORMAT", cls.log_format),
            watch_namespaces=tuple(
                n.strip() for n in get("WATCH_NAMESPACES", "").split(",") if n.strip()
            ),
            nats=NatsSettings(
                url=nats_url,
                replicas=max(1, int(get("NATS_REPLICAS", str(NatsSettings.replicas)))),
                bootstrap_secret=get("BOOTSTRAP_SECRET", NatsSettings.bootstrap_secret),
            ),
            webhook=WebhookSettings(
                port=int(get("WEBHOOK_PORT", str(WebhookSettings.port))),
                addr=get("WEBHOOK_ADDR", WebhookSettings.addr),
                cert_dir=Path(cert_dir) if cert_dir else None,
                self_register_url=e.get("NATSMESH_WEBHOOK_SELF_REGISTER_URL") or None,
                failure_policy=get("WEBHOOK_FAILURE_POLICY", WebhookSettings.failure_policy),
                enabled=get("WEBHOOK_ENABLED", "true").lower() == "true",
                client_ca_file=Path(client_ca) if client_ca else None,
                client_names=tuple(
                    n.strip() for n in get("WEBHOOK_CLIENT_NAMES", "").split(",") if n.strip()
                ),
            ),
            injection=InjectionSettings(
                image=get("SIDECAR_IMAGE", InjectionSettings.image),
                image_pull_policy=get(
                    "SIDECAR_IMAGE_PULL_POLICY", InjectionSettings.image_pull_policy
                ),
                nats_url=get("SIDECAR_NATS_URL", nats_url),
                cpu_request=get("SIDECAR_CPU_REQUEST", InjectionSettings.cpu_request),
                memory_request=get("SIDECAR_MEMORY_REQUEST", InjectionSettings.memory_request),
                memory_limit=get("SIDECAR_MEMORY_LIMIT", InjectionSettings.memory_limit),
                ready_period_seconds=float(
                    get("SIDECAR_READY_PERIOD_SECONDS", str(InjectionSettings.ready_period_seconds))
                ),
                ready_failure_threshold=int(
                    get(
                        "SIDECAR_READY_FAILURE_THRESHOLD",
                        str(InjectionSettings.ready_failure_threshold),
                    )
                ),
                otlp_endpoint=_otlp_endpoint(get("SIDECAR_OTLP_ENDPOINT", "")),
                trace_sample_ratio=min(
                    1.0,
                    max(
                        0.0,
                        float(
                            get(
                                "SIDECAR_TRACE_SAMPLE_RATIO",
                                str(InjectionSettings.trace_sample_ratio),
                            )
                        ),
                    ),
                ),
            ),
            creds=CredsSettings(
                ttl_seconds=max(300, int(get("CREDS_TTL_SECONDS", str(CredsSettings.ttl_seconds)))),
                max_control_line=max(
                    4096,
                    int(get("NATS_MAX_CONTROL_LINE", str(CredsSettings.max_control_line))),
                ),
                revocation_grace_seconds=max(
                    0.0,
                    float(
                        get(
                            "CREDS_REVOCATION_GRACE_SECONDS",
                            str(CredsSettings.revocation_grace_seconds),
                        )
                    ),
                ),
            ),
            network=NetworkSettings(
                app_policy=get("APP_NETWORK_POLICY", "true").strip().lower() != "false",
            ),
            reconcile=ReconcileSettings(
                drift_interval=float(get("DRIFT_INTERVAL", str(ReconcileSettings.drift_interval))),
                retry_delay=float(get("RETRY_DELAY", str(ReconcileSettings.retry_delay))),
                endpoints_interval=float(
                    get("ENDPOINTS_INTERVAL", str(ReconcileSettings.endpoints_interval))
                ),
                api_connections=int(get("API_CONNECTIONS", str(ReconcileSettings.api_connections))),
            ),
        )


def _otlp_endpoint(value: str) -> str:
    """The sidecars' OTLP endpoint, refused here if they would refuse it:
    injected, every new meshed pod's sidecar would exit at start."""
    value = value.strip()
    if value:
        from natsmesh_sidecar.observe.otlp import Endpoint  # the sidecar's own check

        try:
            Endpoint.parse(value)
        except ValueError as exc:
            raise ValueError(f"NATSMESH_SIDECAR_OTLP_ENDPOINT: {exc}") from None
    return value
