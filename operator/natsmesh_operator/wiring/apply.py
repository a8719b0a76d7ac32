"""Apply a :class:`~.plan.MeshPlan` to a running NATS system, idempotently.

* Account JWTs: looked up with ``$SYS.REQ.ACCOUNT.<id>.CLAIMS.LOOKUP`` and
  pushed with ``$SYS.REQ.CLAIMS.UPDATE`` (as the system user) only when their
  content differs; accounts we manage that are no longer wanted are removed
  with the resolver's ``$SYS.REQ.CLAIMS.DELETE`` (a request signed by the
  operator's signing key), after their streams are removed.
* Streams, consumers, the route KV bucket and (for a namespace with an
  exactlyOnce subscriber) the completed-key bucket: per account, through a short-
  lived admin user signed by that account's key; created when missing,
  updated when a field we own drifted, left alone otherwise. Fields whose
  change would lose data (storage, retention, deliver/ack policy) are reported
  as errors, never "fixed" by deleting.
* Route tables: a KV put only when the stored bytes differ.
* Deleting is explicit: only ``prune=True`` removes accounts, streams,
  consumers and keys, and only those carrying our ``natsmesh.io/managed`` mark.

Every step is counted in an :class:`ApplyReport`; a second apply of the same
plan reports no change. Nothing here raises for a refused step: it becomes an
:class:`~.errors.ApplyError` in the report.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials

from natsmesh_operator.wiring import jwt
from natsmesh_operator.wiring.accounts import MANAGED_TAG, account_claims, delete_request_claims
from natsmesh_operator.wiring.errors import ApplyError, Problem
from natsmesh_operator.wiring.jetstream import (
    CONSUMER_IMMUTABLE,
    STREAM_IMMUTABLE,
    consumer_config,
    differences,
    done_stream_config,
    done_window_ms,
    is_managed,
    routes_stream_config,
    stream_config,
)
from natsmesh_operator.wiring.keys import Key, KeyRing, Role
from natsmesh_operator.wiring.plan import MeshPlan
from natsmesh_operator.wiring.users import managed_user_nats
from natsmesh_sidecar import natsload, signing, subjects

log = logging.getLogger(__name__)

ADMIN_USER_TTL = 600
JS_READY_SECONDS = 5.0
CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"
CLAIMS_DELETE = "$SYS.REQ.CLAIMS.DELETE"
CLAIMS_LIST = "$SYS.REQ.CLAIMS.LIST"
JS = subjects.JS_API_PREFIX


def claims_lookup_subject(account: str) -> str:
    return f"$SYS.REQ.ACCOUNT.{account}.CLAIMS.LOOKUP"


@dataclass
class ApplyReport:
    accounts_pushed: list[str] = field(default_factory=list)
    accounts_unchanged: list[str] = field(default_factory=list)
    accounts_deleted: list[str] = field(default_factory=list)
    streams_created: list[str] = field(default_factory=list)
    streams_updated: list[str] = field(default_factory=list)
    streams_unchanged: list[str] = field(default_factory=list)
    streams_deleted: list[str] = field(default_factory=list)
    consumers_created: list[str] = field(default_factory=list)
    consumers_updated: list[str] = field(default_factory=list)
    consumers_unchanged: list[str] = field(default_factory=list)
    consumers_deleted: list[str] = field(default_factory=list)
    kv_put: list[str] = field(default_factory=list)
    kv_unchanged: list[str] = field(default_factory=list)
    kv_deleted: list[str] = field(default_factory=list)
    errors: list[ApplyError] = field(default_factory=list)
    problems: tuple[Problem, ...] = ()

    CHANGE_FIELDS = (
        "accounts_pushed",
        "accounts_deleted",
        "streams_created",
        "streams_updated",
        "streams_deleted",
        "consumers_created",
        "consumers_updated",
        "consumers_deleted",
        "kv_put",
        "kv_deleted",
    )

    @property
    def changes(self) -> dict[str, list[str]]:
        return {f: getattr(self, f) for f in self.CHANGE_FIELDS if getattr(self, f)}

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    @property
    def ok(self) -> bool:
        return not self.errors


class ApplyFailed(RuntimeError):
    """The NATS system could not be reached at all (not a refused step)."""


async def _quiet_error(exc: Exception) -> None:
    # nats-py's default callback logs a full traceback for every failed
    # attempt; the caller reports the outcome once, with its cause.
    log.debug("nats connection error: %s", exc)


async def connect_creds(url: str | list[str], creds: str, **kwargs: Any) -> NATS:
    """Connect with a creds body held in memory (no temp file with a seed).

    Fails fast when NATS is down: nats-py's initial connect otherwise retries
    each server ``max_reconnect_attempts`` (60) times, even with
    ``allow_reconnect=False`` -- two minutes before an error.
    """
    # A comma-separated list too (as nats-server and the nats CLI take it):
    # the servers of a cluster without one Service in front of them.
    servers = url if isinstance(url, list) else [u.strip() for u in url.split(",") if u.strip()]
    natsload.websocket_transport_for(servers)
    options: dict[str, Any] = {
        "allow_reconnect": False,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.1,
        "connect_timeout": 3,
        "error_cb": _quiet_error,
        **kwargs,
    }
    if options["allow_reconnect"] or len(servers) == 1:
        nc: NATS = await nats.connect(
            servers=servers, user_credentials=RawCredentials(creds), **options
        )
        return nc
    # Without reconnects nats-py gives up at the first server that refuses
    # (one restarting): each in turn, in random order to spread the load.
    failed: Exception | None = None
    for server in random.sample(servers, len(servers)):
        try:
            nc = await nats.connect(
                servers=[server], user_credentials=RawCredentials(creds), **options
            )
        except Exception as exc:
            failed = exc
            continue
        return nc
    assert failed is not None
    raise failed


OPERATOR_USER_NAME = "natsmesh-operator"
"""The JWT ``name`` of the operator's own short-lived users (see :func:`admin_creds`)."""


def admin_creds(
    account: Key, *, ttl: int = ADMIN_USER_TTL, subscribe_only: Sequence[str] = ()
) -> str:
    """A short-lived user of one account, for the operator's own use.

    All-powerful, or with ``subscribe_only`` a user that may subscribe to
    those subjects and publish nothing (what a long-lived watch needs).
    """
    user = Key.create(Role.USER)
    permissions: dict[str, object] = {}
    if subscribe_only:
        permissions = {"pub": {"deny": [">"]}, "sub": {"allow": list(subscribe_only)}}
    token = jwt.encode(
        {
            "sub": user.public,
            "name": OPERATOR_USER_NAME,
            "exp": int(time.time()) + ttl,
            "nats": managed_user_nats(permissions),
        },
        account,
    )
    return jwt.creds(token, user.seed)


async def _request(nc: NATS, subject: str, body: bytes, wait: float) -> dict[str, Any]:
    msg = await nc.request(subject, body, timeout=wait)
    if not msg.data:
        return {}
    decoded = json.loads(msg.data)
    return decoded if isinstance(decoded, dict) else {"data": decoded}


async def put_signed(js: Any, account: Key, key: str, value: bytes) -> None:
    """Put a route-bucket value, signed by its namespace ``account`` key
    (sidecars apply nothing else: see natsmesh_sidecar.signing)."""
    signature = signing.sign_table(account.sign, key, value)
    await js.publish(
        f"$KV.{subjects.ROUTES_BUCKET}.{key}", value, headers={signing.HEADER: signature}
    )


async def put_table(js: Any, account: Key, service: str, value: bytes) -> None:
    """Put ``service``'s own route table (see :func:`put_signed`)."""
    await put_signed(js, account, subjects.routes_key(service), value)


class Applier:
    """Applies plans; use as ``async with Applier(...) as a: await a.apply(plan)``."""

    def __init__(
        self,
        *,
        url: str | list[str],
        signer: Key,
        system_creds: str,
        keyring: KeyRing,
        timeout: float = 5.0,
        replicas: int = 1,
    ) -> None:
        self.url = url
        self.replicas = replicas
        """Replicas of the mesh's own streams (route bucket, dead letters):
        the NATS cluster's size."""
        self.signer = signer
        """The operator's signing key (the root only for a legacy bootstrap)."""
        self.system_creds = system_creds
        self.keyring = keyring
        self.timeout = timeout
        self._sys: NATS | None = None

    async def __aenter__(self) -> Applier:
        try:
            self._sys = await connect_creds(self.url, self.system_creds)
        except Exception as exc:
            raise ApplyFailed(f"cannot connect to NATS as the system user: {exc}") from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._sys is not None:
            await self._sys.close()
            self._sys = None

    @property
    def sys(self) -> NATS:
        if self._sys is None:
            raise ApplyFailed("Applier used outside 'async with'")
        return self._sys

    # ---------------------------------------------------------------- accounts

    async def lookup_account(self, account: str) -> str | None:
        """The JWT the resolver holds for ``account``, or None."""
        try:
            msg = await self.sys.request(claims_lookup_subject(account), b"", timeout=self.timeout)
        except nats.errors.TimeoutError:
            return None
        text = msg.data.decode().strip()
        return text if text.count(".") == 2 and not text.startswith("{") else None

    async def list_accounts(self) -> list[str]:
        resp = await _request(self.sys, CLAIMS_LIST, b"", self.timeout)
        data = resp.get("data", [])
        return [a for a in data if isinstance(a, str)] if isinstance(data, list) else []

    async def push_account(self, token: str) -> None:
        resp = await _request(self.sys, CLAIMS_UPDATE, token.encode(), self.timeout)
        if "error" in resp:
            raise RuntimeError(resp["error"].get("description", str(resp["error"])))

    async def delete_accounts(self, accounts: list[str]) -> None:
        token = jwt.encode(delete_request_claims(self.signer.public, accounts), self.signer)
        resp = await _request(self.sys, CLAIMS_DELETE, token.encode(), self.timeout)
        if "error" in resp:
            raise RuntimeError(resp["error"].get("description", str(resp["error"])))

    def account_jwt_claims(
        self, plan: MeshPlan, namespace: str, revocations: Mapping[str, int] | None = None
    ) -> jwt.Claims:
        return account_claims(
            plan.accounts[namespace],
            self.keyring.account(namespace).public,
            lambda ns: self.keyring.account(ns).public,
            revocations=revocations,
        )

    async def _apply_accounts(
        self,
        plan: MeshPlan,
        report: ApplyReport,
        revocations: Mapping[str, Mapping[str, int]],
    ) -> None:
        pushed: set[str] = set()
        # Exporters first: an import of an account the server has not seen
        # yet is only resolved later, so pushing in this order makes a new
        # cross-namespace pair work at once.
        order = sorted(plan.accounts, key=lambda ns: (bool(plan.accounts[ns].imports), ns))
        for ns in order:
            claims = self.account_jwt_claims(plan, ns, revocations.get(ns))
            public = claims["sub"]
            current = await self.lookup_account(public)
            if current and jwt.same_content(current, claims, self.signer.public):
                report.accounts_unchanged.append(ns)
                continue
            try:
                await self.push_account(jwt.encode(claims, self.signer))
            except Exception as exc:
                report.errors.append(ApplyError(ns, "account", str(exc)))
                continue
            pushed.add(ns)
            report.accounts_pushed.append(ns)
            log.info("pushed account %s (%s)", ns, public)

    async def _prune_accounts(self, plan: MeshPlan, report: ApplyReport) -> None:
        wanted = {self.keyring.account(ns).public for ns in plan.accounts}
        doomed: dict[str, str] = {}
        for account in await self.list_accounts():
            if account in wanted:
                continue
            token = await self.lookup_account(account)
            if not token:
                continue
            try:
                decoded = jwt.decode(token)
            except jwt.JwtError:
                continue
            tags = decoded.nats.get("tags") or []
            if MANAGED_TAG not in tags or decoded.claims.get("name") == "SYS":
                continue
            doomed[account] = str(decoded.claims.get("name", account))
        for account, name in sorted(doomed.items(), key=lambda kv: kv[1]):
            try:
                # Streams first: once the account is gone nobody can reach them.
                await self._prune_jetstream_of(name, account, report)
                await self.delete_accounts([account])
            except Exception as exc:
                report.errors.append(ApplyError(name, "delete account", str(exc)))
                continue
            report.accounts_deleted.append(name)
            log.info("deleted account %s (%s)", name, account)

    async def _prune_jetstream_of(self, namespace: str, account: str, report: ApplyReport) -> None:
        slot = KeyRing.account_slot(namespace)
        if slot not in self.keyring.dump():
            return
        key = self.keyring.account(namespace)
        if key.public != account:
            return
        nc = await connect_creds(self.url, admin_creds(key))
        try:
            for cfg in await self._list_streams(nc):
                if is_managed(cfg):
                    await _request(nc, f"{JS}.STREAM.DELETE.{cfg['name']}", b"", self.timeout)
                    report.streams_deleted.append(f"{namespace}/{cfg['name']}")
        finally:
            await nc.close()

    # --------------------------------------------------------------- jetstream

    async def _list_streams(self, nc: NATS) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            body = json.dumps({"offset": offset}).encode()
            resp = await _request(nc, f"{JS}.STREAM.LIST", body, self.timeout)
            streams = resp.get("streams") or []
            out += [s["config"] for s in streams]
            offset += len(streams)
            if not streams or offset >= int(resp.get("total", 0)):
                return out

    async def _list_consumers(self, nc: NATS, stream: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            body = json.dumps({"offset": offset}).encode()
            resp = await _request(nc, f"{JS}.CONSUMER.LIST.{stream}", body, self.timeout)
            consumers = resp.get("consumers") or []
            out += [c["config"] | {"name": c["name"]} for c in consumers]
            offset += len(consumers)
            if not consumers or offset >= int(resp.get("total", 0)):
                return out

    async def _ensure_stream(
        self, nc: NATS, namespace: str, wanted: dict[str, Any], report: ApplyReport
    ) -> bool:
        name = wanted["name"]
        label = f"{namespace}/{name}"
        info = await _request(nc, f"{JS}.STREAM.INFO.{name}", b"", self.timeout)
        if "error" in info and info["error"].get("err_code") != 10059:
            report.errors.append(ApplyError(namespace, f"stream {name}", _err(info)))
            return False
        if "error" in info:
            resp = await _request(
                nc, f"{JS}.STREAM.CREATE.{name}", json.dumps(wanted).encode(), self.timeout
            )
            if "error" in resp:
                report.errors.append(ApplyError(namespace, f"stream {name}", _err(resp)))
                return False
            report.streams_created.append(label)
            await self._wait_for_leader(nc, name)
            return True
        diff = differences(wanted, info["config"])
        if not diff:
            report.streams_unchanged.append(label)
            return True
        frozen = [d for d in diff if d in STREAM_IMMUTABLE]
        if frozen:
            report.errors.append(
                ApplyError(
                    namespace,
                    f"stream {name}",
                    f"{', '.join(frozen)} cannot change on a live stream without losing its "
                    "events; delete the stream explicitly to recreate it",
                )
            )
            return True
        merged = info["config"] | wanted
        resp = await _request(
            nc, f"{JS}.STREAM.UPDATE.{name}", json.dumps(merged).encode(), self.timeout
        )
        if "error" in resp:
            report.errors.append(ApplyError(namespace, f"stream {name}", _err(resp)))
            return True
        report.streams_updated.append(label)
        log.info("updated stream %s: %s", label, ", ".join(diff))
        return True

    async def _wait_for_leader(self, nc: NATS, name: str) -> None:
        """A new stream of a clustered JetStream takes a moment to elect its
        leader; a put meanwhile found no stream (the pass failed and the
        route tables came only with the next one). A server outside a cluster
        (no ``cluster.name``) leads its streams at once."""
        deadline = time.monotonic() + JS_READY_SECONDS
        while time.monotonic() < deadline:
            info = await _request(nc, f"{JS}.STREAM.INFO.{name}", b"", self.timeout)
            cluster = info.get("cluster") or {}
            if "error" not in info and (cluster.get("leader") or not cluster.get("name")):
                return
            await asyncio.sleep(0.05)
        log.warning("stream %s has no leader after %.0fs", name, JS_READY_SECONDS)

    async def _ensure_consumer(
        self, nc: NATS, namespace: str, stream: str, wanted: dict[str, Any], report: ApplyReport
    ) -> None:
        name = wanted["name"]
        label = f"{namespace}/{stream}/{name}"
        info = await _request(nc, f"{JS}.CONSUMER.INFO.{stream}.{name}", b"", self.timeout)
        action = "create"
        if "error" not in info:
            diff = differences(wanted, info["config"])
            if not diff:
                report.consumers_unchanged.append(label)
                return
            frozen = [d for d in diff if d in CONSUMER_IMMUTABLE]
            if frozen:
                report.errors.append(
                    ApplyError(
                        namespace,
                        f"consumer {stream}/{name}",
                        f"{', '.join(frozen)} cannot change on a live consumer; delete it "
                        "explicitly to recreate it (its position is lost)",
                    )
                )
                return
            action = "update"
        elif info["error"].get("err_code") != 10014:
            report.errors.append(ApplyError(namespace, f"consumer {stream}/{name}", _err(info)))
            return
        body = json.dumps({"stream_name": stream, "config": wanted, "action": action}).encode()
        subject = f"{JS}.CONSUMER.CREATE.{stream}.{name}.{wanted['filter_subject']}"
        resp = await _request(nc, subject, body, self.timeout)
        if "error" in resp:
            report.errors.append(ApplyError(namespace, f"consumer {stream}/{name}", _err(resp)))
            return
        (report.consumers_created if action == "create" else report.consumers_updated).append(label)

    async def _wait_for_jetstream(self, nc: NATS, namespace: str) -> None:
        """JetStream of a just-pushed account answers only after the server enabled it.

        Until then its API has no responders; without this wait a new namespace
        failed its first pass and stayed failed until the next one.
        """
        deadline = time.monotonic() + JS_READY_SECONDS
        while True:
            try:
                await nc.request(f"{JS}.INFO", b"", timeout=0.5)
                return
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if time.monotonic() >= deadline:
                    raise
                log.debug("JetStream of %s not ready yet", namespace)
                await asyncio.sleep(0.1)

    async def _apply_namespace(
        self, plan: MeshPlan, namespace: str, report: ApplyReport, prune: bool
    ) -> None:
        nc = await connect_creds(self.url, admin_creds(self.keyring.account(namespace)))
        try:
            await self._wait_for_jetstream(nc, namespace)
            js = nc.jetstream(timeout=self.timeout)
            wanted_streams = {s.name: s for s in plan.streams_in(namespace)}
            ok_streams = set()
            for s in wanted_streams.values():
                if await self._ensure_stream(
                    nc, namespace, stream_config(s, self.replicas), report
                ):
                    ok_streams.add(s.name)
            await self._ensure_stream(nc, namespace, routes_stream_config(self.replicas), report)
            keep = {subjects.routes_stream()}
            exactly_once = plan.exactly_once_of(namespace)
            if exactly_once:
                # Only a namespace with an exactlyOnce subscriber pays for it;
                # replicated like the mesh's other own streams.
                config = done_stream_config(done_window_ms(exactly_once), self.replicas)
                await self._ensure_stream(nc, namespace, config, report)
                keep.add(subjects.done_stream())
            wanted_consumers: dict[str, set[str]] = {}
            for c in plan.consumers_in(namespace):
                wanted_consumers.setdefault(c.stream, set()).add(c.name)
                if c.stream in ok_streams:
                    await self._ensure_consumer(nc, namespace, c.stream, consumer_config(c), report)
            if prune:
                await self._prune_streams(
                    nc, namespace, wanted_streams, wanted_consumers, keep, report
                )
            kv = await js.key_value(subjects.ROUTES_BUCKET)
            account = self.keyring.account(namespace)
            wanted_keys = set()
            values = [
                (subjects.routes_key(svc), table.to_json())
                for (ns, svc), table in plan.tables.items()
                if ns == namespace
            ] + [
                (subjects.target_key(svc), target.to_json())
                for (ns, svc), target in plan.targets.items()
                if ns == namespace
            ]
            for key, value in values:
                wanted_keys.add(key)
                signature = signing.sign_table(account.sign, key, value)
                current: bytes | None = None
                current_sig: str | None = None
                try:
                    last = await js.get_last_msg(
                        subjects.routes_stream(), f"$KV.{subjects.ROUTES_BUCKET}.{key}"
                    )
                    if (last.headers or {}).get("KV-Operation") is None:
                        current, current_sig = last.data, (last.headers or {}).get(signing.HEADER)
                except nats.js.errors.NotFoundError:
                    pass
                # The signature too: bytes a tenant managed to store there
                # unsigned are drift like any other.
                if current == value and current_sig == signature:
                    report.kv_unchanged.append(f"{namespace}/{key}")
                    continue
                await put_signed(js, account, key, value)
                report.kv_put.append(f"{namespace}/{key}")
            if prune:
                try:
                    keys = await kv.keys()
                except nats.js.errors.NoKeysError:
                    keys = []
                for key in sorted(set(keys) - wanted_keys):
                    await js.publish(
                        f"$KV.{subjects.ROUTES_BUCKET}.{key}",
                        b"",
                        headers={
                            "KV-Operation": "DEL",
                            signing.HEADER: signing.sign_delete(account.sign, key),
                        },
                    )
                    report.kv_deleted.append(f"{namespace}/{key}")
        finally:
            await nc.close()

    async def _prune_streams(
        self,
        nc: NATS,
        namespace: str,
        wanted_streams: Mapping[str, object],
        wanted_consumers: Mapping[str, set[str]],
        keep: set[str],
        report: ApplyReport,
    ) -> None:
        for cfg in await self._list_streams(nc):
            name = cfg["name"]
            if not is_managed(cfg) or name in keep:
                continue
            if name not in wanted_streams:
                await _request(nc, f"{JS}.STREAM.DELETE.{name}", b"", self.timeout)
                report.streams_deleted.append(f"{namespace}/{name}")
                continue
            for c in await self._list_consumers(nc, name):
                if is_managed(c) and c["name"] not in wanted_consumers.get(name, set()):
                    subject = f"{JS}.CONSUMER.DELETE.{name}.{c['name']}"
                    await _request(nc, subject, b"", self.timeout)
                    report.consumers_deleted.append(f"{namespace}/{name}/{c['name']}")

    # --------------------------------------------------------------- the whole

    async def apply(
        self,
        plan: MeshPlan,
        *,
        prune: bool = False,
        revocations: Mapping[str, Mapping[str, int]] | None = None,
    ) -> ApplyReport:
        """Make NATS match ``plan``; see the module docstring."""
        report = ApplyReport(problems=plan.problems)
        await self._apply_accounts(plan, report, revocations or {})
        failed = {e.namespace for e in report.errors}
        for ns in sorted(plan.accounts):
            if ns in failed:
                continue
            try:
                await self._apply_namespace(plan, ns, report, prune)
            except Exception as exc:
                log.warning("applying JetStream objects of %s failed: %s", ns, exc)
                report.errors.append(ApplyError(ns, "jetstream", f"{type(exc).__name__}: {exc}"))
        if prune:
            await self._prune_accounts(plan, report)
        return report

    async def push_accounts(
        self, plan: MeshPlan, revocations: Mapping[str, Mapping[str, int]]
    ) -> ApplyReport:
        """Only the account JWTs of ``plan`` (pushed where they differ): what a
        new revocation needs, without re-applying streams, consumers and tables."""
        report = ApplyReport(problems=plan.problems)
        await self._apply_accounts(plan, report, revocations)
        return report


def _err(resp: Mapping[str, Any]) -> str:
    err = resp.get("error") or {}
    return f"{err.get('description', 'error')} (code {err.get('err_code', err.get('code'))})"
