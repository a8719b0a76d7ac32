"""What the handlers share while the operator runs: clients, the reconciler, servers.

Built in kopf's startup handler (so everything lives on kopf's event loop)
and kept in ``memo.runtime``; closed in the cleanup handler.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.admissionregistration_v1 import (
    MutatingWebhook,
    RuleWithOperations,
    ValidatingWebhook,
    WebhookClientConfig,
)
from lightkube.models.meta_v1 import LabelSelector, LabelSelectorRequirement, ObjectMeta
from lightkube.resources.admissionregistration_v1 import (
    MutatingWebhookConfiguration,
    ValidatingWebhookConfiguration,
)
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from natsmesh_operator.api import GROUP, VERSION
from natsmesh_operator.handlers import kube as kube_mod
from natsmesh_operator.handlers import rollout
from natsmesh_operator.handlers.creds_watch import CredsWatch
from natsmesh_operator.handlers.drift import DriftLoop, Peering
from natsmesh_operator.handlers.followup import AfterPass
from natsmesh_operator.handlers.mesh import MeshReconciler
from natsmesh_operator.handlers.presence import EndpointTracker
from natsmesh_operator.handlers.stream_watch import StreamWatch
from natsmesh_operator.metrics import METRICS
from natsmesh_operator.settings import OperatorSettings
from natsmesh_operator.webhook.server import ClientIdentity, WebhookServer
from natsmesh_operator.webhook.tls import ServingCert

logger = logging.getLogger(__name__)


def webhook_config_name(operator_namespace: str) -> str:
    """Self-registered configurations are named per operator, so test beds can share a cluster."""
    return f"natsmesh-{operator_namespace}"


@dataclass
class Runtime:
    settings: OperatorSettings
    kube: AsyncClient
    mesh: MeshReconciler
    endpoints: EndpointTracker
    creds_watch: CredsWatch
    stream_watch: StreamWatch
    after_pass: AfterPass
    drift: DriftLoop
    webhook: WebhookServer | None = None
    _metrics_runner: web.AppRunner | None = field(default=None, repr=False)

    @classmethod
    def build(cls, settings: OperatorSettings, *, identity: str = "") -> Runtime:
        """``identity``: this replica's kopf peering identity (main.py sets it)."""
        kube = kube_mod.client_from_env()
        mesh = MeshReconciler(
            kube_client=kube,
            nats_url=settings.nats.url,
            nats_replicas=settings.nats.replicas,
            operator_namespace=settings.namespace,
            bootstrap_secret=settings.nats.bootstrap_secret,
            watched=settings.watched,
            creds=settings.creds,
            app_network_policy=settings.network.app_policy,
            retry_delay=settings.reconcile.retry_delay,
        )
        webhook = None
        if settings.webhook.enabled:
            cert_dir = settings.webhook.cert_dir
            client = None
            if settings.webhook.client_ca_file is not None:
                client = ClientIdentity(
                    settings.webhook.client_ca_file, settings.webhook.client_names
                )
            webhook = WebhookServer(
                services_of=functools.partial(kube_mod.namespace_services, kube),
                client=client,
                injection=settings.injection,
                operator_namespace=settings.namespace,
                watched=settings.watched,
                cert=ServingCert(cert_dir / "ca.crt", cert_dir / "tls.crt", cert_dir / "tls.key")
                if cert_dir
                else None,
                addr=settings.webhook.addr,
                port=settings.webhook.port,
            )
        retry = settings.reconcile.retry_delay
        endpoints = EndpointTracker(kube, mesh, watched=settings.watches, retry_delay=retry)
        peering = None
        if settings.peering is not None:
            peering = Peering(
                kube,
                name=settings.peering,
                identity=identity,
                priority=settings.peering_priority,
                clusterwide=not settings.watch_namespaces,
            )
            # Any namespace this replica serves tells (kopf keeps a peering in each).
            first = settings.watch_namespaces[0] if settings.watch_namespaces else ""
            mesh.paused = functools.partial(peering.paused, first)
        return cls(
            settings=settings,
            kube=kube,
            mesh=mesh,
            endpoints=endpoints,
            creds_watch=CredsWatch(kube, mesh, watched=settings.watched, retry_delay=retry),
            stream_watch=StreamWatch(mesh, watched=settings.watches, retry_delay=retry),
            after_pass=AfterPass(
                mesh,
                restart=functools.partial(rollout.restart_selected, kube, injecting=True),
                recount=functools.partial(endpoints.mark, again=True),
            ),
            drift=DriftLoop(
                mesh,
                endpoints,
                interval=settings.reconcile.endpoints_interval,
                drift_interval=settings.reconcile.drift_interval,
                peering=peering,
            ),
            webhook=webhook,
        )

    async def start(self) -> None:
        self.mesh.start()
        self.endpoints.start()
        self.creds_watch.start()
        self.stream_watch.start()
        self.drift.start()
        await self._start_metrics()
        if self.webhook is not None:
            await self.webhook.start()
            if self.settings.webhook.self_register_url:
                await self.register_webhooks(self.settings.webhook.self_register_url)

    async def stop(self) -> None:
        await self.drift.stop()
        await self.after_pass.stop()
        await self.stream_watch.stop()
        await self.creds_watch.stop()
        await self.endpoints.stop()
        await self.mesh.stop()
        if self.webhook is not None:
            await self.webhook.stop()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        await self.kube.close()

    # ------------------------------------------------------------ metrics/health

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(METRICS.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, _: web.Request) -> web.Response:
        last = self.mesh.last
        if last is not None and last.fatal:
            # Alive (a restart would not help), but say why we are degraded.
            return web.json_response({"status": "degraded", "reason": last.fatal})
        return web.json_response({"status": "ok"})

    async def _start_metrics(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._health)
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        port = self.settings.metrics_port
        await web.TCPSite(self._metrics_runner, "0.0.0.0", port).start()
        logger.info("metrics and health on :%s", port)

    # ------------------------------------------------------------ local test bed

    async def register_webhooks(self, url: str) -> None:
        """Write webhook configurations pointing at ``url`` (the chart does this in a cluster)."""
        cert = self.webhook.cert if self.webhook else None
        ca_b64 = base64.b64encode(cert.ca_bundle()).decode() if cert else None
        not_ours = LabelSelectorRequirement(
            key="kubernetes.io/metadata.name",
            operator="NotIn",
            values=[self.settings.namespace, "kube-system"],
        )
        mutating = MutatingWebhookConfiguration(
            metadata=ObjectMeta(name=webhook_config_name(self.settings.namespace)),
            webhooks=[
                MutatingWebhook(
                    name="inject.natsmesh.io",
                    admissionReviewVersions=["v1"],
                    sideEffects="None",
                    failurePolicy=self.settings.webhook.failure_policy,
                    timeoutSeconds=5,
                    reinvocationPolicy="Never",
                    clientConfig=WebhookClientConfig(url=f"{url}/inject", caBundle=ca_b64),
                    namespaceSelector=LabelSelector(
                        matchLabels={"natsmesh.io/inject": "enabled"},
                        matchExpressions=[not_ours],
                    ),
                    rules=[
                        RuleWithOperations(
                            apiGroups=[""],
                            apiVersions=["v1"],
                            operations=["CREATE"],
                            resources=["pods"],
                            scope="Namespaced",
                        )
                    ],
                )
            ],
        )
        validating = ValidatingWebhookConfiguration(
            metadata=ObjectMeta(name=webhook_config_name(self.settings.namespace)),
            webhooks=[
                ValidatingWebhook(
                    name="validate.natsmesh.io",
                    admissionReviewVersions=["v1"],
                    sideEffects="None",
                    failurePolicy=self.settings.webhook.failure_policy,
                    timeoutSeconds=5,
                    clientConfig=WebhookClientConfig(url=f"{url}/validate", caBundle=ca_b64),
                    rules=[
                        RuleWithOperations(
                            apiGroups=[GROUP],
                            apiVersions=[VERSION],
                            operations=["CREATE", "UPDATE"],
                            resources=["natsservices", "natsroutes"],
                            scope="Namespaced",
                        )
                    ],
                )
            ],
        )
        for obj in (mutating, validating):
            await self.kube.apply(obj, force=True)
        logger.info("registered webhooks at %s", url)

    async def unregister_webhooks(self) -> None:
        for kind in (MutatingWebhookConfiguration, ValidatingWebhookConfiguration):
            with contextlib.suppress(ApiError):
                await self.kube.delete(kind, webhook_config_name(self.settings.namespace))


def from_memo(memo: Any) -> Runtime:
    runtime: Runtime = memo.runtime
    return runtime
