"""``status.endpoints`` that follows sidecars within a second or two.

What counts as an endpoint is unchanged: a sidecar that answers ``$SRV.PING``
in its namespace's account with the mesh's metadata. What changed is *when*
the operator counts. It listens, as the system account user it already has,
to the server's ``$SYS.ACCOUNT.<account>.CONNECT`` and ``.DISCONNECT``
advisories: every client of every namespace account, with no change to the
accounts' exports, the sidecars or their permissions. An advisory names the
account, so the operator recounts that namespace (coalesced: one count per
burst and at most one per :data:`GAP` seconds) and patches ``status.endpoints``
of the services whose count changed. A per-service timer still asks for a
recount now and then, which covers an advisory lost during a NATS outage.

A connect advisory comes as the client connects, a few milliseconds before
a sidecar has subscribed to ``$SRV.PING``; a second count
:data:`FOLLOW_UP` seconds later catches a sidecar slow to get there. The
operator's own connections (its short-lived admin users) are recognised by
their JWT name and ignored, or every count would trigger the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.types import PatchType
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from natsmesh_operator.api import NatsService
from natsmesh_operator.handlers import kube
from natsmesh_operator.handlers.background import Background
from natsmesh_operator.handlers.coalesce import Coalescer
from natsmesh_operator.handlers.intents import service_name
from natsmesh_operator.metrics import METRICS
from natsmesh_operator.wiring import jwt
from natsmesh_operator.wiring.apply import OPERATOR_USER_NAME, admin_creds, connect_creds
from natsmesh_operator.wiring.keys import Key
from natsmesh_sidecar import subjects
from natsmesh_sidecar.transport.micro import SERVING_KEY

if TYPE_CHECKING:
    from natsmesh_operator.handlers.mesh import MeshReconciler

logger = logging.getLogger(__name__)

ADVISORIES = ("$SYS.ACCOUNT.*.CONNECT", "$SYS.ACCOUNT.*.DISCONNECT")
SETTLE = 0.1
"""Seconds a count waits for the rest of a burst of advisories."""
GAP = 0.3
"""At most one count (and one status write per service) per namespace this often."""
FOLLOW_UP = 1.0
"""Seconds after a connect advisory for a second count."""
PING_WAIT = 0.3
"""Seconds a count collects ``$SRV.PING`` answers."""
TIMER_MIN_AGE = 5.0
"""A timer's count is skipped when the namespace was counted this recently:
N services' timers of one namespace are one count, and events keep it fresh."""
COUNT_CONCURRENCY = 8
"""Namespaces counted at once: a (re)connect counts every namespace, and each
count is a connection of its own."""

Counts = dict[tuple[str, str], int]


class Advisory(NamedTuple):
    account: str
    connected: bool
    user: str
    """The client's user public key (what revocations name)."""


def advisory(subject: str, data: bytes) -> Advisory | None:
    """What a client advisory says, or None if it does not matter.

    None for anything unreadable and for the operator's own users: the JWT
    in an advisory is the one the server accepted, so its name is the
    operator's word, not the client's.
    """
    connected = subject.endswith(".CONNECT")
    try:
        client = json.loads(data)["client"]
        account = str(client["acc"])
        user = str(client.get("user") or "")
        token = client.get("jwt")
        name = jwt.decode(token, verify_signature=False).claims.get("name") if token else None
    except (ValueError, KeyError, TypeError):  # JwtError is a ValueError
        return None
    if name == OPERATOR_USER_NAME:
        return None
    return Advisory(account, connected, user)


async def count_endpoints(nats_url: str, account: Key, *, wait: float = PING_WAIT) -> Counts:
    """Live sidecars per ``(service, version)``: answers to ``$SRV.PING`` in the account."""
    counts: Counts = {}
    nc = await connect_creds(nats_url, admin_creds(account))
    try:
        # Under the one foreign inbox prefix sidecars may answer into.
        inbox = f"{subjects.OPERATOR_INBOX_ROOT}.{uuid.uuid4().hex}"
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.PING", b"", reply=inbox)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except TimeoutError:
                break
            try:
                info = json.loads(msg.data)
                meta = info.get("metadata") or {}
                key = (str(info["name"]), str(meta.get("version", "")))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            # A sidecar out of its queue group (app not ready) serves nothing;
            # older sidecars do not say, and are in it whenever connected.
            if meta.get("natsmesh.io/sidecar") == "true" and meta.get(SERVING_KEY) != "false":
                counts[key] = counts.get(key, 0) + 1
    finally:
        await nc.close()
    return counts


def endpoint_changes(
    counts: Mapping[tuple[str, str], int], services: Sequence[Mapping[str, Any]]
) -> dict[str, int]:
    """``{NatsService name: count}`` for the services whose ``status.endpoints`` differs."""
    out: dict[str, int] = {}
    for body in services:
        if body.get("metadata", {}).get("deletionTimestamp"):
            continue
        try:
            svc = NatsService.from_body(body)
        except ValueError:  # its status says Invalid; nothing to count
            continue
        count = counts.get((service_name(svc), svc.spec.version), 0)
        if (body.get("status") or {}).get("endpoints") != count:
            out[str(svc.metadata.name)] = count
    return out


class EndpointTracker:
    """Counts a namespace's endpoints when its clients come and go; writes the changes."""

    def __init__(
        self,
        kube_client: AsyncClient,
        mesh: MeshReconciler,
        *,
        watched: Callable[[str], bool] = lambda _: True,
        retry_delay: float = 5.0,
        settle: float = SETTLE,
        gap: float = GAP,
        follow_up: float = FOLLOW_UP,
    ) -> None:
        self.kube = kube_client
        self.mesh = mesh
        self.watched = watched
        self.retry_delay = retry_delay
        self.follow_up = follow_up
        self.counts = Coalescer(self._recount, settle=settle, gap=gap)
        self._accounts: dict[str, str] = {}
        self._counting = asyncio.Semaphore(COUNT_CONCURRENCY)
        self._listener = Background("natsmesh-endpoints", self._listen)

    def start(self) -> None:
        self._listener.start()

    async def stop(self) -> None:
        await self._listener.stop()
        await self.counts.stop()

    def refresh(self, namespace: str) -> None:
        """The timers' safety net: a count unless one ran in the last :data:`TIMER_MIN_AGE`."""
        if not self.counts.ran_within(namespace, TIMER_MIN_AGE):
            self.mark(namespace)

    def mark(self, namespace: str, *, again: bool = False) -> None:
        """Recount ``namespace`` soon (and once more a little later with ``again``)."""
        if self.watched(namespace):
            self.counts.mark(namespace, again_after=self.follow_up if again else None)

    # ------------------------------------------------------------ advisories

    async def _listen(self) -> None:
        """Hold a system account connection subscribed to the advisories, forever."""
        while True:
            closed = asyncio.Event()

            async def on_closed(closed: asyncio.Event = closed) -> None:
                closed.set()

            try:
                nc = await self._connect(on_closed)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning(
                    "endpoint advisories unavailable (%s); retrying in %gs", exc, self.retry_delay
                )
                await asyncio.sleep(self.retry_delay)
                continue
            try:
                for subject in ADVISORIES:
                    await nc.subscribe(subject, cb=self._on_advisory)
                await nc.flush()
                logger.info("following client advisories for live endpoints")
                # Sidecars may have come or gone while we were not listening.
                await self._mark_all()
                await closed.wait()
                logger.warning("advisory connection closed; reconnecting")
            finally:
                with contextlib.suppress(Exception):
                    await nc.close()

    async def _connect(self, on_closed: Callable[[], Awaitable[None]]) -> NATS:
        creds = await self.mesh.system_creds()

        async def reconnected() -> None:
            # Advisories sent while we were away are lost: count everything.
            await self._mark_all()

        return await connect_creds(
            self.mesh.nats_url,
            creds,
            name="natsmesh-operator-advisories",
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            reconnected_cb=reconnected,
            closed_cb=on_closed,
        )

    async def _on_advisory(self, msg: Msg) -> None:
        found = advisory(msg.subject, msg.data)
        if found is None:
            return
        if not found.connected and self.mesh.holding(found.user):
            # Maybe the last connection of a key whose revocation is held:
            # the pass that revokes it need not wait for its timer.
            self.mesh.poke()
        namespace = await self._namespace_of(found.account)
        if namespace is not None:
            self.mark(namespace, again=found.connected)

    async def _namespace_of(self, account: str) -> str | None:
        namespace = self._accounts.get(account)
        if namespace is None:
            keys = await self.mesh.keys()
            if len(keys.namespaces()) != len(self._accounts):
                # A namespace account made since: learn the new keys once.
                self._accounts = keys.accounts_by_key()
                namespace = self._accounts.get(account)
        return namespace

    def _planned(self) -> set[str] | None:
        """The namespaces whose accounts the last pass planned (None: no pass yet)."""
        last = self.mesh.last
        if last is None or last.plan is None:
            return None
        return set(last.plan.accounts)

    async def _mark_all(self) -> None:
        planned = self._planned()
        for namespace in planned if planned is not None else (await self.mesh.keys()).namespaces():
            self.mark(namespace)

    # ------------------------------------------------------------ counting

    async def _recount(self, namespace: str) -> None:
        account = (await self.mesh.keys()).existing_account(namespace)
        planned = self._planned()
        if planned is not None and namespace not in planned:
            # Its account is gone from NATS (the key stays in the ring): a
            # connection as its user would only fail, after the server
            # waited for the account JWT it no longer has.
            account = None
        try:
            async with self._counting:
                counts = await count_endpoints(self.mesh.nats_url, account) if account else {}
        except Exception as exc:  # NATS down: keep the last counts, the timer retries
            logger.debug("counting endpoints of %s failed: %s", namespace, exc)
            return
        METRICS.endpoint_counts.inc()
        listed = self.kube.list(kube.NatsServiceRes, namespace=namespace)
        services = [kube.body_of(obj) async for obj in listed]
        for name, count in endpoint_changes(counts, services).items():
            try:
                await self.kube.patch(
                    kube.NatsServiceRes.Status,
                    name,
                    {"status": {"endpoints": count}},
                    namespace=namespace,
                    patch_type=PatchType.MERGE,
                )
                METRICS.endpoint_writes.inc()
            except ApiError as exc:
                if exc.status.code != 404:  # deleted meanwhile
                    logger.warning("endpoints of %s/%s: %s", namespace, name, exc)
