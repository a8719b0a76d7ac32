"""Revocations held back, bounded: a narrowing re-issue made before break.

A re-issue that narrows a user gives it a new key and revokes the old one.
Revoking at once cut every sidecar still connected with the old key before
it could have the new creds (a kubelet rewrites a mounted Secret up to about
a minute later), so each narrowing failed requests. Instead the old key is
*held*: it stays valid until no server reports a connection with it (the
sidecars took the new creds up, make before break) or until ``until``,
whichever comes first; then it goes into the account's revocations.

This module is the pure part: the held entries (persisted in the keys Secret
beside the revocations, written *before* the creds Secret moves off the old
key, so an operator restart never forgets one), the decision when one is
due, and the question to the servers how many connections a key has.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from nats.aio.client import Client as NATS

from natsmesh_operator.wiring.keys import Role, is_public

logger = logging.getLogger(__name__)

HELD_KEY = "held-revocations.json"
"""Entry of the keys Secret with the held revocations."""
CONNZ_PING = "$SYS.REQ.SERVER.PING.CONNZ"
"""Every server answers with its own connections (system account only)."""
CONNZ_WAIT = 1.0
"""Seconds at most that a connection count collects answers."""
CONNZ_STALL = 0.15
"""Once every key has an answer: seconds without a further one that end it."""
CONNZ_LIMIT = 64
"""Connections a server lists per key at most: whether there are any is what
matters, the count is for the log."""


@dataclass(frozen=True)
class Held:
    """An old user key still valid while its service's sidecars move to new creds."""

    namespace: str
    user: str
    service: str
    """The NatsService whose creds moved off ``user``."""
    since: int
    until: int
    """Epoch seconds at which it is revoked whatever happens."""


class HeldRevocations:
    """The held entries, one per (namespace, user key)."""

    def __init__(self, entries: Iterable[Held] = ()) -> None:
        self._entries = {(h.namespace, h.user): h for h in entries}

    def __iter__(self) -> Iterator[Held]:
        return iter(sorted(self._entries.values(), key=lambda h: (h.namespace, h.user)))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, user: object) -> bool:
        """Whether ``user`` (a public key) is held in any namespace."""
        return any(u == user for _, u in self._entries)

    def hold(self, namespace: str, user: str, service: str, *, now: int, grace: float) -> Held:
        """Hold ``user`` for ``grace`` seconds from ``now``.

        An existing hold keeps its deadline: holding a key again (the
        re-issue failed and is retried, or someone put the old creds back
        into the Secret) never extends the grace.
        """
        until = now + int(grace)
        found = self._entries.get((namespace, user))
        entry = (
            replace(found, service=service)
            if found is not None and found.until <= until
            else Held(namespace, user, service, now, until)
        )
        self._entries[(namespace, user)] = entry
        return entry

    def remove(self, held: Held) -> None:
        self._entries.pop((held.namespace, held.user), None)

    def dump(self) -> str:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for h in self:
            out.setdefault(h.namespace, {})[h.user] = {
                "service": h.service,
                "since": h.since,
                "until": h.until,
            }
        return json.dumps(out, sort_keys=True)

    @classmethod
    def load(cls, raw: str) -> HeldRevocations:
        """Entries from the keys Secret. One whose key is a user key but whose
        times are unreadable is due at once (fail closed: a held key must
        never outlive its deadline because its record was damaged)."""
        try:
            data = json.loads(raw)
        except ValueError:
            logger.error("held revocations in the keys Secret are not JSON; none loaded")
            return cls()
        entries = []
        for ns, users in data.items() if isinstance(data, dict) else ():
            if not isinstance(ns, str) or not isinstance(users, dict):
                continue
            for user, record in users.items():
                if not isinstance(user, str) or not is_public(user, Role.USER):
                    continue
                rec = record if isinstance(record, dict) else {}
                since, until = rec.get("since"), rec.get("until")
                if not (isinstance(since, int) and isinstance(until, int)):
                    since = until = 0
                entries.append(Held(ns, user, str(rec.get("service", "")), since, until))
        return cls(entries)


def due(held: Held, *, now: float, connections: int | None, live: bool) -> str | None:
    """Why ``held`` is to be revoked now, or None to keep holding it.

    ``connections``: open connections of its key over all servers (None when
    unknown: a server did not answer, or answered with an error).
    ``live``: its NatsService still exists.
    """
    if not live:
        return "service deleted"
    if now >= held.until:
        return "grace expired"
    if connections == 0:
        return "no connection uses it"
    return None


async def user_connections(
    nc: NATS,
    wanted: Iterable[tuple[str, str]],
    *,
    wait: float = CONNZ_WAIT,
    stall: float = CONNZ_STALL,
) -> dict[tuple[str, str], int]:
    """Open connections per ``(account, user key)`` over every server that answers
    (at most :data:`CONNZ_LIMIT` per server).

    One ``CONNZ`` request per key to all servers, filtered by account and
    user. A key is in the result only if some server answered for it and
    none reported an error. Servers are not enumerated: answers are
    collected until ``stall`` seconds pass without one (once each key has
    one) or ``wait`` in all, so a server slower than that is not counted.
    """
    keys = list(dict.fromkeys(wanted))
    if not keys:
        return {}
    inbox = f"_INBOX.{uuid.uuid4().hex}"
    replies: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()

    async def on_reply(msg: Any) -> None:
        try:
            index = int(str(msg.subject).rsplit(".", 1)[1])
        except (ValueError, IndexError):
            return
        replies.put_nowait((index, bytes(msg.data)))

    sub = await nc.subscribe(f"{inbox}.*", cb=on_reply)
    counts: dict[int, int] = {}
    failed: set[int] = set()
    try:
        for index, (account, user) in enumerate(keys):
            body = json.dumps({"acc": account, "user": user, "limit": CONNZ_LIMIT})
            await nc.publish(CONNZ_PING, body.encode(), reply=f"{inbox}.{index}")
        await nc.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while (left := deadline - loop.time()) > 0:
            answered = set(counts) | failed
            timeout = min(left, stall) if len(answered) >= len(keys) else left
            try:
                index, data = await asyncio.wait_for(replies.get(), timeout)
            except TimeoutError:
                break
            if not 0 <= index < len(keys):
                continue
            found = connections_in(data)
            if found is None:
                failed.add(index)
            else:
                counts[index] = counts.get(index, 0) + found
    finally:
        await sub.unsubscribe()
    return {keys[i]: n for i, n in counts.items() if i not in failed}


def connections_in(data: bytes) -> int | None:
    """Open connections in one server's ``CONNZ`` answer, None if it is an error."""
    try:
        answer = json.loads(data)
        if answer.get("error"):
            return None
        found = answer["data"]["num_connections"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return found if isinstance(found, int) and found >= 0 else None
