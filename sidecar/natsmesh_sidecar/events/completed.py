"""Completed Idempotency-Keys of ``exactlyOnce`` subscriptions, shared by all replicas.

Why: JetStream's double ack is not the last word. An ack the server confirmed
can be lost with the server (``kill -9`` before it wrote the consumer's
state), and a 2xx the app gave is lost with its sidecar when the sidecar dies
before acking. Either way the event comes again -- perhaps to another replica
-- with the same Idempotency-Key. So after the app's 2xx and *before* the ack,
the key is written to the namespace account's KV bucket ``natsmesh-done``
(made by the operator, entries expire after the redelivery window), and
before a delivery is handed to the app its key is looked up there.

Keys: ``<source-namespace>.<consumer>.<sha256(key), base64url>``: a key may hold
any byte, a KV key may not, and the user's permissions name the
``<source-namespace>.<consumer>`` prefix of its own subscriptions only. A
lookup is a direct get (one request, no consumer, the least permission); a
write is a JetStream publish.

Sealed: JetStream publishes on a client's behalf to whatever reply subject
the client chose (a publish ack, a direct get answer), so another service of
the namespace could make the bucket store bytes under one of our keys and
have an event skipped. The value is therefore an HMAC of the entry's subject
under a key derived from the service's own creds seed (which only its
replicas hold); a value that does not match is a miss. Without creds (a dev
server, no accounts) values are empty and not checked.

Never blocking: a lookup or a write that fails is counted and the event is
delivered (at least once is the floor). A failed write is kept and retried,
and the keys this process completed are remembered (bounded): a NATS outage,
the usual reason an ack is lost, costs no duplicate while this process lives.
What remains is a sidecar that dies between the app's 2xx and the write.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from natsmesh_sidecar import subjects
from natsmesh_sidecar.logthrottle import LogThrottle

logger = logging.getLogger(__name__)

HIT = "hit"
MISS = "miss"
UNKNOWN = "unknown"

LOOKUP_TIMEOUT = 1.0
WRITE_TIMEOUT = 2.0
#: Keys this process completed, answered without asking NATS. Bounded in
#: number and age: the bucket is the record, this only bridges an outage.
REMEMBER = 10_000
REMEMBER_SECONDS = 600.0
#: Writes that failed, kept for the next flush (the oldest dropped past this).
UNWRITTEN = 10_000
FLUSH_BATCH = 256
_DELETED = frozenset({"DEL", "PURGE"})


def seal_key(seed: str) -> bytes:
    """The HMAC key of completed-key values, derived from the user's nkey seed."""
    return hashlib.sha256(b"natsmesh-done\x00" + seed.encode()).digest()


def seal(secret: bytes | None, subject: str) -> bytes:
    if secret is None:
        return b""
    return base64.urlsafe_b64encode(hmac.digest(secret, subject.encode(), "sha256")).rstrip(b"=")


def key_token(key: str) -> str:
    """A KV-key-safe, fixed-length stand-in for an Idempotency-Key."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class CompletedKeys:
    """One subscription's completed keys.

    ``connection`` returns the current NATS connection (or None), ``jetstream``
    a JetStream context of the namespace's own account, ``secret`` the current
    seal key (None without creds), ``unavailable`` is called with ``lookup`` or
    ``record`` for each operation the store failed.
    """

    def __init__(
        self,
        scope: str,
        *,
        connection: Callable[[], Any],
        jetstream: Callable[[], Any],
        secret: Callable[[], bytes | None],
        unavailable: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scope = scope
        self._connection = connection
        self._jetstream = jetstream
        self._secret = secret
        self._unavailable = unavailable
        self._clock = clock
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._unwritten: OrderedDict[str, None] = OrderedDict()
        self._logs = LogThrottle()

    @property
    def unwritten(self) -> int:
        return len(self._unwritten)

    async def lookup(self, key: str) -> str:
        """``HIT`` (completed before), ``MISS``, or ``UNKNOWN`` (the store did not answer)."""
        token = key_token(key)
        if self._remembered(token):
            return HIT
        nc = self._connection()
        if nc is None or not nc.is_connected:
            return self._failed("lookup", "not connected")
        subject = subjects.done_key_subject(self.scope, token)
        try:
            msg = await nc.request(
                subjects.done_direct_get(self.scope, token), b"", timeout=LOOKUP_TIMEOUT
            )
        except Exception as exc:
            return self._failed("lookup", f"{type(exc).__name__}: {exc}")
        hdrs = msg.headers or {}
        status = hdrs.get("Status")
        if status == "404":
            return MISS
        if status:
            return self._failed("lookup", f"direct get answered {status} {hdrs.get('Description')}")
        if hdrs.get("KV-Operation") in _DELETED:
            return MISS
        secret = self._secret()
        if secret is not None and not hmac.compare_digest(msg.data, seal(secret, subject)):
            # Not written by this service (or by it under creds since
            # replaced): delivering is the safe side.
            if self._logs.allow("unsealed") is not None:
                logger.warning("completed keys %s: ignored an unsealed entry", self.scope)
            return MISS
        return HIT

    async def record(self, key: str) -> bool:
        """Write ``key`` as completed; False when the store did not confirm (kept for later)."""
        token = key_token(key)
        self._remember(token)
        if await self._put(token):
            return True
        self._unwritten[token] = None
        while len(self._unwritten) > UNWRITTEN:
            self._unwritten.popitem(last=False)
        return False

    async def flush(self) -> int:
        """Retry writes that failed, oldest first, until one fails; returns how many landed."""
        done = 0
        for token in list(self._unwritten)[:FLUSH_BATCH]:
            if not await self._put(token):
                break
            self._unwritten.pop(token, None)
            done += 1
        if done:
            logger.info("completed keys %s: %d delayed writes landed", self.scope, done)
        return done

    async def _put(self, token: str) -> bool:
        subject = subjects.done_key_subject(self.scope, token)
        try:
            await self._jetstream().publish(
                subject, seal(self._secret(), subject), timeout=WRITE_TIMEOUT
            )
        except Exception as exc:
            self._failed("record", f"{type(exc).__name__}: {exc}")
            return False
        return True

    def _failed(self, op: str, why: str) -> str:
        self._unavailable(op)
        held = self._logs.allow(op)
        if held is not None:
            logger.warning(
                "completed keys %s: %s failed (%s); delivering anyway%s",
                self.scope,
                op,
                why,
                f" ({held} more not logged)" if held else "",
            )
        return UNKNOWN

    def _remember(self, token: str) -> None:
        self._recent[token] = self._clock()
        self._recent.move_to_end(token)
        while len(self._recent) > REMEMBER:
            self._recent.popitem(last=False)

    def _remembered(self, token: str) -> bool:
        at = self._recent.get(token)
        return at is not None and self._clock() - at < REMEMBER_SECONDS
