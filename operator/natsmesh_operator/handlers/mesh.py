"""The mesh reconciler: one serialized, coalescing pass over the whole mesh.

NATS state is not per object: a service's permissions depend on who lists it
as a caller, imports on other namespaces' exports, route tables on every
NatsService of a service. So handlers do not apply anything themselves; they
ask for a *pass* and wait for one that started after their change:

1. list every NatsService and NatsRoute from the API server (a complete,
   fresh snapshot: pruning is only ever against the whole truth, so an
   operator restart can never delete a stream it has not "seen" yet);
2. compute the plan (:func:`natsmesh_operator.wiring.plan.plan`, pure);
3. apply it (:class:`~natsmesh_operator.wiring.apply.Applier`: only what
   differs is pushed, so a pass over an unchanged mesh writes nothing);
4. issue, rotate or remove the creds Secrets.

Requests that arrive during a pass are served together by the next one, so
a burst of 1,000 applies costs a handful of passes, not 1,000.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lightkube import AsyncClient

from natsmesh_operator.api import NatsRoute, NatsService
from natsmesh_operator.handlers import bounded, intents, kube, policies, status, tap_creds
from natsmesh_operator.handlers.background import Background
from natsmesh_operator.metrics import METRICS
from natsmesh_operator.settings import CredsSettings
from natsmesh_operator.watched import EVERYWHERE, Watched
from natsmesh_operator.webhook.inject import CREDS_KEY, creds_secret_name
from natsmesh_operator.wiring import jwt, users
from natsmesh_operator.wiring.apply import (
    Applier,
    ApplyFailed,
    ApplyReport,
)
from natsmesh_operator.wiring.bootstrap import Bootstrap, BootstrapError
from natsmesh_operator.wiring.held import HELD_KEY, Held, HeldRevocations, due, user_connections
from natsmesh_operator.wiring.keys import Key, KeyRing, NKeyError, Role, is_public
from natsmesh_operator.wiring.plan import MeshPlan, plan

logger = logging.getLogger(__name__)

KEYS_SECRET = "natsmesh-keys"  # noqa: S105 - a Secret name, not a secret
"""Secret (operator namespace) with the account seeds and revoked user keys."""
REVOCATIONS_KEY = "revocations.json"
KEYS_SECRET_BUDGET = 640 * 1024
"""Bytes of data the keys Secret may hold (before base64): the API server
refuses objects over 1 MiB, and seeds that cannot be saved are lost keys."""
CREDS_CONCURRENCY = 16
HOLD_FIRST_CHECK = 1.0
"""Seconds after a pass that held a revocation until the pass that looks whether
the old key is still connected (nobody may have used it at all)."""
HOLD_RECHECK = 10.0
"""While a revocation is held, a pass at least this often: the disconnect
advisory that normally ends the hold may have been lost."""


@dataclass(frozen=True)
class CredsOutcome:
    """What happened to one service's creds Secret in a pass."""

    ok: bool
    reason: str
    message: str
    user: str | None = None
    """Public key of the user now in the Secret."""
    expires: int | None = None


@dataclass
class PassResult:
    """Everything a handler needs to write its status after a pass."""

    started: float
    plan: MeshPlan | None = None
    report: ApplyReport | None = None
    creds: dict[tuple[str, str], CredsOutcome] = field(default_factory=dict)
    fatal: str | None = None
    """Set when the pass could not run at all (NATS or the API unreachable)."""
    invalid: list[kube.Invalid] = field(default_factory=list)
    """Resources left out of the pass: each fails its own status only."""
    policy_errors: dict[tuple[str, str], str] = field(default_factory=dict)
    """NatsServices whose NetworkPolicy could not be written, and why."""
    held: dict[tuple[str, str], Held] = field(default_factory=dict)
    """NatsServices whose previous (wider) user key is still valid, held."""

    def namespace_errors(self, namespace: str) -> list[str]:
        if self.report is None:
            return []
        return [f"{e.what}: {e.message}" for e in self.report.errors if e.namespace == namespace]


R = TypeVar("R", NatsService, NatsRoute)


def _revocation_count(revocations: Mapping[str, Mapping[str, int]]) -> int:
    return sum(len(v) for v in revocations.values())


class KeysOverBudget(RuntimeError):
    """The keys Secret would outgrow :data:`KEYS_SECRET_BUDGET`."""


def load_revocations(raw: str) -> dict[str, dict[str, int]]:
    """Revocations from the keys Secret: only ``{namespace: {user key: time}}``
    entries that are well formed are kept (anything else never went out)."""
    try:
        data = json.loads(raw)
    except ValueError:
        logger.error("revocations in the keys Secret are not JSON; starting from none")
        return {}
    out: dict[str, dict[str, int]] = {}
    for ns, users_ in data.items() if isinstance(data, dict) else ():
        if not isinstance(ns, str) or not isinstance(users_, dict):
            continue
        kept = {
            u: t
            for u, t in users_.items()
            if isinstance(u, str) and isinstance(t, int) and is_public(u, Role.USER)
        }
        if kept:
            out[ns] = kept
    return out


def issued_user(secret: Any, account: Key | None, *, recorded: bool) -> str | None:
    """The user key the operator issued into a creds Secret, or None if it did not.

    Proof, not trust in labels: the JWT in it must be signed by the
    namespace's account key (only the operator holds it) and name a user
    key. With ``recorded`` the Secret must also be owned by a NatsService and
    carry that key in our annotation -- what revocation requires, since a
    revoked key stops a service. Any malformed content is just "not ours".
    """
    if account is None or secret is None or secret.metadata is None:
        return None
    try:
        creds = kube.decode_secret(secret).get(CREDS_KEY)
        if not creds:
            return None
        token, _ = jwt.parse_creds(creds)
        decoded = jwt.decode(token)
        user = decoded.subject
    except (ValueError, KeyError, TypeError):  # JwtError and NKeyError are ValueErrors
        return None
    if decoded.issuer != account.public or not isinstance(user, str):
        return None
    if not is_public(user, Role.USER):
        return None
    if recorded:
        annotations = secret.metadata.annotations or {}
        if annotations.get(kube.ANNOTATION_ISSUED_USER) != user:
            return None
        if not kube.controlled_by_natsservice(secret):
            return None
    return user


def retry_backoff(failed_passes: int, cap: float) -> float:
    """Seconds before the pass after ``failed_passes`` failed ones in a row."""
    return min(cap, 2.0 ** min(failed_passes, 16))


class MeshReconciler:
    def __init__(
        self,
        *,
        kube_client: AsyncClient,
        nats_url: str,
        operator_namespace: str,
        nats_replicas: int = 1,
        bootstrap_secret: str,
        watched: Watched = EVERYWHERE,
        creds: CredsSettings | None = None,
        app_network_policy: bool = True,
        retry_delay: float = 10.0,
    ) -> None:
        self.retry_delay = retry_delay
        self._later: asyncio.TimerHandle | None = None
        """The one timer for "pass again later" (a retry, a held revocation's
        check): the earliest asked for since the last pass wins."""
        self._failed_passes = 0
        self.watched = watched
        self.app_network_policy = app_network_policy
        self.creds_settings = creds or CredsSettings()
        self.kube = kube_client
        self.nats_url = nats_url
        self.nats_replicas = nats_replicas
        self.operator_namespace = operator_namespace
        self.bootstrap_secret = bootstrap_secret
        self._warned_legacy = False
        self._requested = 0
        self._done = 0
        #: With kopf peering: whether kopf has paused this replica now
        #: (natsmesh_operator.handlers.drift.Peering). Pokes ask for no pass
        #: then: they come from our own watches, which kopf does not pause,
        #: and the active replica's watches see the same event.
        self.paused: Callable[[], Awaitable[bool]] | None = None
        #: The one pause check in flight for pokes, and whether more pokes
        #: came while it ran (a burst of events is one peering read, not one
        #: per event).
        self._poking: asyncio.Task[None] | None = None
        self._poked_again = False
        self._wakeup = asyncio.Event()
        self._finished = asyncio.Condition()
        self._loop_task = Background("natsmesh-mesh-reconciler", self._loop)
        self._keys: KeyRing | None = None
        self._keys_version: str | None = None
        """resourceVersion of the keys Secret as this process last read or wrote it."""
        self._revocations: dict[str, dict[str, int]] = {}
        self._held = HeldRevocations()
        self._held_in_use: set[str] = set()
        """Held keys a live creds Secret still holds (a re-issue that failed):
        revoked once the Secret moves off them, no timer pass for them meanwhile."""
        self._keys_saving = asyncio.Lock()
        self.last: PassResult | None = None

    # ------------------------------------------------------------ scheduling

    def start(self) -> None:
        self._loop_task.start()

    async def stop(self) -> None:
        if self._later is not None:
            self._later.cancel()
        await self._loop_task.stop()

    async def request(self) -> PassResult:
        """Wait for a pass that started after this call; return its result."""
        return await self.result_of(self.ask())

    def ask(self) -> int:
        """Ask for a pass; the ticket :meth:`result_of` waits on."""
        self.start()
        self._requested += 1
        self._wakeup.set()
        return self._requested

    async def result_of(self, ticket: int) -> PassResult:
        """The result of the first pass that started after ``ticket`` was asked for."""
        async with self._finished:
            await self._finished.wait_for(lambda: self._done >= ticket)
        assert self.last is not None
        return self.last

    @property
    def served(self) -> int:
        """The last ticket a finished pass served (every ticket up to it)."""
        return self._done

    def poke(self) -> None:
        """Ask for a pass without waiting for it (an event saw something to
        repair), unless kopf has paused this replica (:attr:`paused`).

        Pokes while a pause check is in flight share it: if it finds the
        replica active, the pass it asks for meets them all; if paused, it
        checks once more only if pokes came meanwhile (the pause may have
        ended since it read the peering object)."""
        paused = self.paused
        if paused is None:
            self.ask()
            return
        if self._poking is not None:
            self._poked_again = True
            return
        self._poking = asyncio.get_running_loop().create_task(self._poke_unless(paused))

    async def _poke_unless(self, paused: Callable[[], Awaitable[bool]]) -> None:
        try:
            while True:
                self._poked_again = False
                try:
                    is_paused = await paused()
                except Exception as exc:
                    # As for an unreadable peering object: no pass (two
                    # writers would be worse); the drift loop's next tick
                    # repairs what the poke was about.
                    logger.warning("a poke's pause check failed: %s", exc)
                    return
                if not is_paused:
                    self.ask()
                    return
                if not self._poked_again:
                    logger.debug("a poke on a paused replica: the active one repairs it")
                    return
        finally:
            self._poking = None

    def refresh(self, max_age: float) -> None:
        """Ask for a pass unless one started less than ``max_age`` seconds ago or is
        already asked for; never waits (what a periodic check needs)."""
        if self._requested > self._done:
            return
        if self.last is not None and time.monotonic() - self.last.started < max_age:
            return
        self.ask()

    def _pass_later(self, delay: float) -> None:
        """A pass in ``delay`` seconds, unless one is already due sooner.

        Whoever asks does so during or right after a pass, and a pass that
        starts meets every earlier request (``_loop`` drops the timer), so
        the earliest request since the last pass is the only one to keep.
        """
        loop = asyncio.get_running_loop()
        if self._later is not None:
            if self._later.when() <= loop.time() + delay:
                return
            self._later.cancel()
        self._later = loop.call_later(delay, self.poke)

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._later is not None:
                self._later.cancel()
                self._later = None
            upto = self._requested
            started = time.monotonic()
            result = await self._pass_and_report(started)
            METRICS.pass_duration.observe(time.monotonic() - started)
            METRICS.passes.labels(result="error" if result.fatal else "ok").inc()
            if result.plan is not None:
                # The statuses are written: keep only what later readers use.
                result.plan = result.plan.kept()
            self.last = result
            self._schedule_retry(result)
            async with self._finished:
                self._done = upto
                self._finished.notify_all()

    def _schedule_retry(self, result: PassResult) -> None:
        """After a pass that failed anywhere, another one follows by itself.

        A handler retries only a fatal pass; an error in one namespace (a
        stream the servers refused while their JetStream cluster was still
        electing, a NetworkPolicy write) would otherwise wait for the next
        drift check, a minute away. Backoff 1, 2, 4 ... s up to
        ``retry_delay``, reset by a clean pass.
        """
        failed = bool(
            result.fatal
            or (result.report is not None and result.report.errors)
            or result.policy_errors
        )
        if not failed:
            self._failed_passes = 0
            return
        delay = retry_backoff(self._failed_passes, self.retry_delay)
        self._failed_passes += 1
        logger.info("the last pass failed in places; another in %.0f s", delay)
        self._pass_later(delay)

    async def _pass_and_report(self, started: float) -> PassResult:
        invalid: list[kube.Invalid] = []
        try:
            services = await kube.list_services(self.kube, self.watched, invalid)
            routes = await kube.list_routes(self.kube, self.watched, invalid)
        except Exception as exc:
            return PassResult(started=started, fatal=f"Kubernetes API unreachable: {exc}")
        services, routes = _with_intents(services, routes, invalid)
        try:
            result = await self._pass(started, services, routes)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a pass must never kill the loop
            logger.exception("mesh pass failed")
            result = PassResult(started=started, fatal=f"{type(exc).__name__}: {exc}")
        result.invalid = invalid
        try:
            # Every resource whose status changed, not only the one that asked:
            # a new caller or publisher changes other services' conditions too.
            await status.write_all(self.kube, result, services, routes)
            await status.write_invalid(self.kube, invalid)
        except Exception:
            logger.exception("writing statuses failed")
        return result

    # ------------------------------------------------------------ one pass

    async def _load_keys(self) -> KeyRing:
        if self._keys is None:
            found = await kube.read_secret_versioned(
                self.kube, KEYS_SECRET, self.operator_namespace
            )
            data, self._keys_version = found if found is not None else ({}, None)
            revocations = data.pop(REVOCATIONS_KEY, "{}")
            self._revocations = load_revocations(revocations)
            self._held = HeldRevocations.load(data.pop(HELD_KEY, "{}"))
            self._keys = KeyRing(data)
        return self._keys

    async def _fresh_keys(self) -> KeyRing:
        """The keys for a pass, re-read if someone else wrote the Secret since.

        A standby replica loads the keys as soon as it counts endpoints, long
        before it takes over; the replica active meanwhile may have added
        account keys, revocations and held revocations. Passing on that stale
        copy would re-push accounts without the newer revocations (old creds
        alive again) and never revoke the newer held keys.
        """
        if self._keys is not None:
            found = await kube.read_secret_versioned(
                self.kube, KEYS_SECRET, self.operator_namespace
            )
            if (found[1] if found is not None else None) != self._keys_version:
                logger.info("the keys Secret was written by another replica: reloading it")
                self._keys = None
        return await self._load_keys()

    async def keys(self) -> KeyRing:
        """The account keys (loaded once from the keys Secret, grown by passes)."""
        return await self._load_keys()

    async def system_creds(self) -> str:
        """The system account user's creds, from the bootstrap Secret."""
        data = await kube.read_secret(self.kube, self.bootstrap_secret, self.operator_namespace)
        if data is None:
            raise LookupError(
                f"bootstrap Secret {self.operator_namespace}/{self.bootstrap_secret} not found"
            )
        return Bootstrap.from_files(data).system_user_creds

    def holding(self, user: str) -> bool:
        """Whether ``user``'s revocation is held (its disconnect may end the hold)."""
        return user in self._held

    async def _save_keys(self, keys: KeyRing) -> None:
        # Concurrent creds writes each save a hold before their Secret moves.
        async with self._keys_saving:
            await self._write_keys(keys)

    async def _write_keys(self, keys: KeyRing) -> None:
        data = dict(keys.dump())
        data[REVOCATIONS_KEY] = json.dumps(self._revocations, sort_keys=True)
        data[HELD_KEY] = self._held.dump()
        size = sum(len(k) + len(v.encode()) for k, v in data.items())
        if size > KEYS_SECRET_BUDGET:
            # Refuse rather than drop entries: a dropped seed is a lost account,
            # a dropped revocation brings old creds back to life.
            raise KeysOverBudget(
                f"Secret {self.operator_namespace}/{KEYS_SECRET} would hold {size} bytes, "
                f"over its budget of {KEYS_SECRET_BUDGET}"
            )
        self._keys_version = await kube.write_secret(
            self.kube, KEYS_SECRET, self.operator_namespace, data, labels={}
        )
        keys.created.clear()

    async def _pass(
        self,
        started: float,
        services: list[tuple[NatsService, Mapping[str, Any]]],
        routes: list[tuple[NatsRoute, Mapping[str, Any]]],
    ) -> PassResult:
        boot_data = await kube.read_secret(
            self.kube, self.bootstrap_secret, self.operator_namespace
        )
        if boot_data is None:
            return PassResult(
                started=started,
                fatal=f"bootstrap Secret {self.operator_namespace}/{self.bootstrap_secret} "
                "not found: run `natsmesh bootstrap`",
            )
        try:
            boot = Bootstrap.from_files(boot_data)
        except (BootstrapError, NKeyError) as exc:
            return PassResult(
                started=started,
                fatal=f"bootstrap Secret {self.operator_namespace}/{self.bootstrap_secret}: {exc}",
            )
        if boot.legacy and not self._warned_legacy:
            self._warned_legacy = True
            logger.warning(
                "bootstrap Secret %s/%s holds the NATS operator root key and no signing key: "
                "run `natsmesh bootstrap rotate-signing-key` to move the root offline",
                self.operator_namespace,
                self.bootstrap_secret,
            )
        mesh = plan(
            [intents.service_intent(svc) for svc, _ in services],
            [intents.route_intent(r) for r, _ in routes],
        )
        keys = await self._fresh_keys()
        secrets = await kube.list_creds_secrets(self.kube, self.watched)
        by_key = {
            (str(s.metadata.namespace), str(s.metadata.name)): s
            for s in secrets
            if s.metadata is not None
        }
        live = {
            (str(svc.metadata.namespace), creds_secret_name(str(svc.metadata.name)))
            for svc, _ in services
        }
        # Users the live services hold now: never revoked, whatever a Secret
        # elsewhere claims (a copy of a live service's creds is not "stale").
        in_use = {
            user
            for ns, name in live
            if (
                user := issued_user(
                    by_key.get((ns, name)), keys.existing_account(ns), recorded=False
                )
            )
        }
        stale: list[tuple[Any, str]] = []
        for (ns, name), secret in by_key.items():
            if (ns, name) in live:
                continue
            user = issued_user(secret, keys.existing_account(ns), recorded=True)
            if user is not None:
                stale.append((secret, user))
            # Anything else labelled as creds is not ours: not read further,
            # not revoked, not deleted.
        # Users of deleted services are revoked in their account before the
        # Secret goes, so a copied creds file stops working too.
        for secret, user in stale:
            if user not in in_use:
                self._revoke(str(secret.metadata.namespace), str(secret.metadata.name), user)
        bodies = {(str(svc.metadata.namespace), str(svc.metadata.name)): b for svc, b in services}
        try:
            async with self._applier(boot, keys) as applier:
                if await self._release_held(applier, keys, in_use, set(bodies)):
                    # Recorded before it is pushed: the Secret is what a restart knows.
                    await self._save_keys(keys)
                report = await applier.apply(mesh, prune=True, revocations=self._revocations)
        except ApplyFailed as exc:
            return PassResult(
                started=started, plan=mesh, fatal=f"NATS unreachable at {self.nats_url}: {exc}"
            )
        if keys.created:
            await self._save_keys(keys)
        result = PassResult(started=started, plan=mesh, report=report)

        # Re-issues come in bursts (a new caller changes its targets' JWTs):
        # write them concurrently, bounded so the API server is not flooded.
        async def ensure(svc: NatsService) -> None:
            key = (str(svc.metadata.namespace), str(svc.metadata.name))
            try:
                outcome = await self._ensure_creds(svc, bodies[key], mesh, keys, by_key)
            except Exception as exc:  # this service's status, not the pass
                logger.exception("creds of %s/%s", *key)
                outcome = CredsOutcome(False, "CredsFailed", f"{type(exc).__name__}: {exc}")
            result.creds[key] = outcome

        revoked_before = _revocation_count(self._revocations)
        held_before = self._held.dump()
        await bounded.each((svc for svc, _ in services), ensure, CREDS_CONCURRENCY)
        tap = await tap_creds.sync(
            self.kube,
            self.watched,
            mesh.tap_users,
            account=keys.account,
            existing_account=keys.existing_account,
            nats_url=self.nats_url,
            ttl_seconds=self.creds_settings.ttl_seconds,
            revoke=self._revoke,
        )
        for ns, why in tap.errors.items():
            logger.error("tap creds of namespace %s: %s (retried next pass)", ns, why)
        if _revocation_count(self._revocations) != revoked_before:
            # A narrowing re-issue revoked the key it replaced: push that now,
            # not on the next pass, so the old creds stop working within seconds.
            await self._save_keys(keys)
            try:
                async with self._applier(boot, keys) as applier:
                    pushed = await applier.push_accounts(mesh, self._revocations)
                for error in pushed.errors:
                    logger.error("pushing revocations failed (retried next pass): %s", error)
            except ApplyFailed as exc:
                logger.error("pushing revocations failed (retried next pass): %s", exc)
        for secret, _ in stale:
            await kube.delete_secret(
                self.kube, str(secret.metadata.name), str(secret.metadata.namespace)
            )
        for ns in tap.stale:
            await kube.delete_secret(self.kube, tap_creds.TAP_USER, ns)
        if stale or tap.stale:
            await self._save_keys(keys)
        try:
            # Every pass, not only on change: a policy deleted or edited by
            # hand is back within one drift interval.
            report_np = await policies.sync(
                self.kube, services, enabled=self.app_network_policy, watched=self.watched
            )
            result.policy_errors = dict(report_np.errors)
        except Exception as exc:  # listing failed: the services' status, not the pass
            logger.exception("syncing NetworkPolicies failed")
            result.policy_errors = (
                {
                    (
                        str(svc.metadata.namespace),
                        str(svc.metadata.name),
                    ): f"{type(exc).__name__}: {exc}"
                    for svc, _ in services
                }
                if self.app_network_policy
                else {}
            )
        METRICS.managed.labels(kind="NatsService").set(len(services))
        METRICS.managed.labels(kind="NatsRoute").set(len(routes))
        result.held = {
            (h.namespace, h.service): h for h in self._held if h.user not in self._held_in_use
        }
        self._schedule_hold_check(fresh=held_before != self._held.dump())
        if report.changed:
            logger.info("mesh pass applied %s", {k: len(v) for k, v in report.changes.items()})
        return result

    def _applier(self, boot: Bootstrap, keys: KeyRing) -> Applier:
        return Applier(
            url=self.nats_url,
            signer=boot.signing_key,
            system_creds=boot.system_user_creds,
            keyring=keys,
            replicas=self.nats_replicas,
        )

    async def _release_held(
        self,
        applier: Applier,
        keys: KeyRing,
        in_use: set[str],
        live: set[tuple[str, str]],
    ) -> int:
        """Revoke the held keys that are due (:func:`~natsmesh_operator.wiring.held.due`).

        A key a live creds Secret still holds is never revoked: its re-issue
        failed (or the old creds were put back) and this pass re-issues it;
        its deadline stands, so it is revoked on the pass after the move.
        """
        self._held_in_use = {h.user for h in self._held if h.user in in_use}
        candidates = [h for h in self._held if h.user not in in_use]
        if not candidates:
            return 0
        now = time.time()
        accounts = {h.namespace: keys.existing_account(h.namespace) for h in candidates}
        ask = [
            (account.public, h.user)
            for h in candidates
            if now < h.until and (account := accounts[h.namespace]) is not None
        ]
        counts: dict[tuple[str, str], int] = {}
        if ask:
            try:
                counts = await user_connections(applier.sys, ask)
            except Exception as exc:  # unknown counts: only deadlines apply this pass
                logger.warning("counting connections of held user keys failed: %s", exc)
        released = 0
        for h in candidates:
            account = accounts[h.namespace]
            if account is None:  # its account is gone, and the key with it
                self._held.remove(h)
                continue
            why = due(
                h,
                now=now,
                connections=counts.get((account.public, h.user)),
                live=(h.namespace, h.service) in live,
            )
            if why is None:
                continue
            self._held.remove(h)
            self._revocations.setdefault(h.namespace, {})[h.user] = int(now)
            METRICS.held_revocations.labels(why=why).inc()
            METRICS.revocation_hold.observe(max(0.0, now - h.since))
            logger.info(
                "revoking user %s of %s/%s after %.1f s held (%s)",
                h.user, h.namespace, h.service, now - h.since, why,
            )  # fmt: skip
            released += 1
        return released

    def _schedule_hold_check(self, *, fresh: bool) -> None:
        """A pass when the next held revocation is due, or to look again.

        ``fresh``: this pass held a new one; the next looks soon whether any
        connection uses the old key at all. Otherwise the disconnect advisory
        of the old key's last connection asks for the pass that revokes it
        (``handlers/presence.py``); this timer is the safety net.
        """
        waiting = [h for h in self._held if h.user not in self._held_in_use]
        METRICS.revocations_held.set(len(self._held))
        if not waiting:
            return
        delay = min(HOLD_RECHECK, max(0.0, min(h.until for h in waiting) - time.time()))
        if fresh:
            delay = min(delay, HOLD_FIRST_CHECK)
        self._pass_later(delay)

    async def _hold(self, keys: KeyRing, namespace: str, service: str, user: str) -> None:
        """Hold ``user``'s revocation, saved before its creds Secret moves off it
        (the other order could lose it in a restart: a key never revoked)."""
        grace = self.creds_settings.revocation_grace_seconds
        entry = self._held.hold(namespace, user, service, now=int(time.time()), grace=grace)
        self._held_in_use.discard(user)  # the Secret moves off it now
        await self._save_keys(keys)
        logger.info(
            "holding the revocation of user %s of %s/%s until no connection uses it, "
            "at the latest %d s from now",
            user, namespace, service, entry.until - int(time.time()),
        )  # fmt: skip

    def _revoke(self, namespace: str, secret_name: str, user: str) -> None:
        self._revocations.setdefault(namespace, {})[user] = int(time.time())
        logger.info("revoking user %s of %s/%s", user, namespace, secret_name)

    async def _ensure_creds(
        self,
        svc: NatsService,
        body: Mapping[str, Any],
        mesh: MeshPlan,
        keys: KeyRing,
        existing: Mapping[tuple[str, str], Any],
    ) -> CredsOutcome:
        ns, name = str(svc.metadata.namespace), str(svc.metadata.name)
        try:
            user = mesh.user(ns, name)
        except KeyError:
            problems = mesh.problems_for("NatsService", ns, name)
            why = "; ".join(p.message for p in problems) or "the service has no NATS user"
            return CredsOutcome(False, "NoUser", why)
        account = keys.account(ns)
        secret_name = creds_secret_name(name)
        secret = existing.get((ns, secret_name))
        # Only creds we signed are read further: a Secret someone else put
        # under this name is overwritten, its key never reused.
        ours = issued_user(secret, account, recorded=False)
        current = annotated = None
        if ours is not None and secret is not None and secret.metadata is not None:
            current = kube.decode_secret(secret).get(CREDS_KEY)
            annotated = (secret.metadata.annotations or {}).get(kube.ANNOTATION_ISSUED_USER)
        ttl = self.creds_settings.ttl_seconds
        why = users.needs_reissue(current, user, account.public, ttl_seconds=ttl)
        current_user = users.held(current)
        if not why and annotated == ours:
            return CredsOutcome(
                True,
                "CredentialsIssued",
                f"Secret {secret_name} is current",
                user=current_user.public if current_user else None,
                expires=current_user.expires if current_user else None,
            )
        why = why or "recording the issued user"
        user_key = None
        revoke: str | None = None
        retire: str | None = None
        if current_user is not None and current_user.issuer == account.public:
            if current_user.permissions is not None and user.permissions.narrows(
                current_user.permissions
            ):
                # The old JWT allows more than the service now may: a new key,
                # and the old one revoked, so a copy of the old file is useless
                # (held until the sidecars moved over, at most the grace).
                retire = current_user.public
            else:
                # Same identity, new JWT (renewal, or permissions that only grew).
                user_key = current_user.key
        lost = str(((body.get("status") or {}).get("user")) or "")
        if current_user is None and lost and is_public(lost, Role.USER):
            # The Secret was deleted (or emptied) by hand: whoever copied it
            # must not keep a working user. Status is writable by whoever may
            # write natsservices/status, so never a key a live Secret holds.
            live = {
                issued_user(s, account, recorded=False)
                for (s_ns, _), s in existing.items()
                if s_ns == ns
            }
            if lost not in live:
                revoke = lost
        issued = users.issue(user, account, user_key=user_key, ttl_seconds=ttl)
        limit = self.creds_settings.max_jwt_bytes
        if len(issued.jwt) > limit:
            return CredsOutcome(
                False,
                "CredentialsTooLarge",
                f"the user JWT would be {len(issued.jwt)} bytes, over the {limit} bytes a "
                f"NATS CONNECT may carry (max_control_line "
                f"{self.creds_settings.max_control_line}): list fewer allowedCallers from "
                "other namespaces, topics or subscriptions, or raise nats.maxControlLine",
                user=current_user.public if current_user else None,
            )
        if retire is not None:
            if self.creds_settings.revocation_grace_seconds > 0:
                await self._hold(keys, ns, name, retire)
            else:
                revoke = retire
        if revoke:
            self._revocations.setdefault(ns, {})[revoke] = int(time.time())
            logger.info("revoking user %s of %s/%s (%s)", revoke, ns, name, why)
        try:
            await kube.write_secret(
                self.kube,
                secret_name,
                ns,
                {CREDS_KEY: issued.creds},
                labels={kube.LABEL_CREDS: "true", kube.LABEL_SERVICE: name},
                annotations={kube.ANNOTATION_ISSUED_USER: issued.public},
                owner=kube.owner_reference(body),
            )
        except Exception as exc:
            return CredsOutcome(False, "SecretWriteFailed", f"writing Secret {secret_name}: {exc}")
        METRICS.creds_issued.inc()
        logger.info("issued creds for %s/%s (%s)", ns, name, why)
        return CredsOutcome(
            True,
            "CredentialsIssued",
            f"Secret {secret_name} issued ({why})",
            user=issued.public,
            expires=issued.expires,
        )


def _with_intents(
    services: list[tuple[NatsService, Mapping[str, Any]]],
    routes: list[tuple[NatsRoute, Mapping[str, Any]]],
    invalid: list[kube.Invalid],
) -> tuple[list[tuple[NatsService, Mapping[str, Any]]], list[tuple[NatsRoute, Mapping[str, Any]]]]:
    """The resources whose intents can be built; the rest join ``invalid``.

    The CRD schema should make this a no-op; it is what keeps one resource
    the models accept but the wiring cannot read from failing every pass.
    """
    return (
        _readable("NatsService", services, intents.service_intent, invalid),
        _readable("NatsRoute", routes, intents.route_intent, invalid),
    )


def _readable(
    kind: str,
    items: list[tuple[R, Mapping[str, Any]]],
    to_intent: Callable[[R], object],
    invalid: list[kube.Invalid],
) -> list[tuple[R, Mapping[str, Any]]]:
    ok = []
    for resource, body in items:
        try:
            to_intent(resource)
        except Exception as exc:
            invalid.append(kube.Invalid(kind, body, f"{type(exc).__name__}: {exc}"))
        else:
            ok.append((resource, body))
    return ok
