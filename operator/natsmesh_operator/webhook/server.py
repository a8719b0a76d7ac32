"""The admission webhook server: ``POST /inject`` (pods) and ``POST /validate``.

A small aiohttp app on kopf's event loop rather than kopf's admission
support, because we need the request's namespace (a pod being created by a
ReplicaSet may not carry one in its body), certificate reload on rotation
(cert-manager renews files in place), and stateless answers any replica can
give (the NatsServices of the namespace are read from the API server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from natsmesh_operator.api import NatsRoute, NatsService
from natsmesh_operator.metrics import METRICS
from natsmesh_operator.webhook import admission, inject
from natsmesh_operator.webhook.tls import ServingCert

logger = logging.getLogger(__name__)

CERT_CHECK_SECONDS = 10.0

ServicesOf = Callable[[str], Awaitable[list[NatsService]]]
"""The NatsServices of one namespace, not being deleted (read fresh per review)."""


class ClientIdentity:
    """Who may call the webhook: a client certificate from ``cafile``, optionally
    with one of ``names`` as its subject common name or a DNS SAN.

    kube-apiserver presents such a certificate when its admission configuration
    names a kubeconfig with ``client-certificate-data`` for the webhook's host
    (``--admission-control-config-file``, ``WebhookAdmission.kubeConfigFile``).
    """

    def __init__(self, cafile: Path, names: Collection[str] = ()) -> None:
        self.cafile = cafile
        self.names = frozenset(names)

    def allows(self, peercert: Mapping[str, Any] | None) -> bool:
        if not peercert:
            return False  # the TLS layer already refused, but never trust a missing cert
        if not self.names:
            return True
        found = {
            value
            for rdn in peercert.get("subject", ())
            for key, value in rdn
            if key == "commonName"
        }
        found |= {value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"}
        return bool(found & self.names)


class WebhookServer:
    def __init__(
        self,
        *,
        services_of: ServicesOf,
        injection: inject.InjectionSettings,
        operator_namespace: str,
        cert: ServingCert | None,
        watched: Callable[[str], bool] = lambda _: True,
        addr: str,
        port: int,
        client: ClientIdentity | None = None,
        cert_check_interval: float = CERT_CHECK_SECONDS,
    ) -> None:
        self.services_of = services_of
        self.cert_check_interval = cert_check_interval
        self.injection = injection
        self.operator_namespace = operator_namespace
        self.watched = watched
        self.cert = cert
        self.client = client
        self.addr = addr
        self.port = port
        self._runner: web.AppRunner | None = None
        self._ssl: ssl.SSLContext | None = None
        self._cert_seen: tuple[float, float] | None = None
        self._watch: asyncio.Task[None] | None = None

    # --------------------------------------------------------------- lifecycle

    def _load_cert(self) -> None:
        assert self.cert is not None
        assert self._ssl is not None
        self._ssl.load_cert_chain(str(self.cert.certfile), str(self.cert.keyfile))
        self._cert_seen = self.cert.fingerprint()

    async def _watch_cert(self) -> None:
        assert self.cert is not None
        while True:
            await asyncio.sleep(self.cert_check_interval)
            try:
                if self.cert.fingerprint() != self._cert_seen:
                    # New handshakes use the new chain; open connections finish.
                    self._load_cert()
                    logger.info("webhook certificate reloaded from %s", self.cert.certfile)
            except (OSError, ssl.SSLError) as exc:
                logger.warning("webhook certificate reload failed: %s", exc)

    async def start(self) -> None:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post("/inject", self.handle_inject)
        app.router.add_post("/validate", self.handle_validate)
        app.router.add_get("/healthz", self.handle_health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        if self.client is not None and self.cert is None:
            raise ValueError("client certificate verification needs TLS (a serving certificate)")
        if self.cert is not None:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            if self.client is not None:
                # Refused in the handshake: a caller without a certificate from
                # this CA never gets to send a review, forged or not.
                self._ssl.verify_mode = ssl.CERT_REQUIRED
                self._ssl.load_verify_locations(cafile=str(self.client.cafile))
            self._load_cert()
            self._watch = asyncio.create_task(self._watch_cert())
        site = web.TCPSite(self._runner, self.addr, self.port, ssl_context=self._ssl)
        await site.start()
        logger.info("webhook server on %s:%s (tls=%s)", self.addr, self.port, bool(self._ssl))

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._runner is not None:
            await self._runner.cleanup()

    # --------------------------------------------------------------- handlers

    async def handle_health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _review(self, request: web.Request) -> Mapping[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="not JSON") from None
        review = body.get("request") if isinstance(body, dict) else None
        if not isinstance(review, dict) or not isinstance(review.get("uid"), str):
            raise web.HTTPBadRequest(text="not an AdmissionReview request")
        return review

    def _caller_allowed(self, request: web.Request) -> bool:
        if self.client is None:
            return True
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        return self.client.allows(peercert)

    async def _answer(
        self,
        request: web.Request,
        webhook: str,
        decide: Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]],
        outcome_of: Callable[[dict[str, Any]], str],
        failed: str,
    ) -> web.Response:
        """Time and count one review; our own failure refuses (fails closed).

        An error here must not let through what we could not check: a pod
        injected with nothing, or a NatsService whose selector overlaps
        another's. The API server shows the message; a retry usually works.
        """
        started = time.perf_counter()
        if not self._caller_allowed(request):
            METRICS.admissions.labels(webhook=webhook, outcome="forbidden").inc()
            raise web.HTTPForbidden(text="client certificate not allowed")
        review = await self._review(request)
        try:
            response = await decide(review)
            outcome = outcome_of(response["response"])
        except Exception as exc:
            logger.exception("%s webhook failed", webhook)
            outcome = "error"
            response = admission.review_response(
                review["uid"],
                allowed=False,
                code=500,
                message=f"natsmesh: {failed}: {type(exc).__name__}; retry, or see the "
                "operator's log",
            )
        METRICS.admissions.labels(webhook=webhook, outcome=outcome).inc()
        METRICS.admission_duration.labels(webhook=webhook).observe(time.perf_counter() - started)
        return web.json_response(response)

    async def handle_inject(self, request: web.Request) -> web.Response:
        return await self._answer(
            request,
            "inject",
            self.inject,
            lambda r: "injected" if "patch" in r else ("skipped" if r["allowed"] else "denied"),
            "could not decide on sidecar injection",
        )

    async def inject(self, review: Mapping[str, Any]) -> dict[str, Any]:
        uid = review["uid"]
        pod = review.get("object") or {}
        namespace = review.get("namespace") or (pod.get("metadata") or {}).get("namespace")
        if (
            not namespace
            or namespace == self.operator_namespace
            or namespace in admission.NEVER_INJECTED
            or not self.watched(namespace)
            or review.get("operation") != "CREATE"
            or not inject.wants_injection(pod)
        ):
            return admission.review_response(uid)
        labels = (pod.get("metadata") or {}).get("labels") or {}
        try:
            owner = admission.owner_of(labels, await self.services_of(namespace))
        except admission.AmbiguousOwner as exc:
            return admission.review_response(uid, allowed=False, message=str(exc))
        if owner is None:
            return admission.review_response(uid)
        try:
            changes = inject.injection(pod, admission.target_of(owner), self.injection)
        except inject.InvalidInjection as exc:
            return admission.review_response(uid, allowed=False, message=str(exc))
        return admission.review_response(uid, patch=admission.json_patch(changes))

    async def handle_validate(self, request: web.Request) -> web.Response:
        return await self._answer(
            request,
            "validate",
            self.validate,
            lambda r: "allowed" if r["allowed"] else "denied",
            "could not validate",
        )

    async def validate(self, review: Mapping[str, Any]) -> dict[str, Any]:
        uid = review["uid"]
        obj = review.get("object")
        if not obj or review.get("operation") not in ("CREATE", "UPDATE"):
            return admission.review_response(uid)
        namespace = review.get("namespace") or obj.get("metadata", {}).get("namespace")
        if not namespace or not self.watched(namespace):
            return admission.review_response(uid)
        old = review.get("oldObject")
        if old and old.get("spec") == obj.get("spec"):
            # Metadata only (kopf's finalizer and annotations, labels): it
            # changes no claim and no selector, and refusing it would leave a
            # resource that got in while the webhook was down undeletable.
            return admission.review_response(uid)
        services = await self.services_of(namespace)
        try:
            if obj.get("kind") == "NatsRoute":
                route = NatsRoute.from_body(obj)
                return admission.review_response(
                    uid, warnings=admission.route_warnings(route, services)
                )
            svc = NatsService.from_body(obj)
        except ValidationError as exc:
            # The CRD schema should have refused it; say what is wrong instead.
            return admission.review_response(uid, allowed=False, message=f"invalid resource: {exc}")
        errors = admission.validate_service(svc, services, creating=admission.claims_anew(svc, old))
        if errors:
            return admission.review_response(uid, allowed=False, message="; ".join(errors))
        return admission.review_response(uid, warnings=admission.caller_warnings(svc, services))
