"""The sidecar's own publish permissions, read from the user JWT in its creds file.

NATS does not fail a forbidden publish: the server sends an asynchronous
permissions-violation error and the request simply times out. So the sidecar
decides "403 not permitted" itself, before sending, from the same claims the
server enforces. The JWT's signature is not checked here: the server does that;
the sidecar only needs to read its own claims.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable

from natsmesh_sidecar.subjects import subject_matches

logger = logging.getLogger(__name__)

_JWT_BEGIN = "-----BEGIN NATS USER JWT-----"


class Permissions:
    """Publish allow/deny lists with NATS semantics; decisions are cached per subject."""

    __slots__ = ("_cache", "allow", "deny", "restricted")

    def __init__(
        self, allow: Iterable[str] = (), deny: Iterable[str] = (), *, restricted: bool = True
    ) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        # No allow list in the JWT means "everything not denied".
        self.restricted = restricted and bool(self.allow)
        self._cache: dict[str, bool] = {}

    @classmethod
    def allow_all(cls) -> Permissions:
        return cls(restricted=False)

    def can_publish(self, subject: str) -> bool:
        hit = self._cache.get(subject)
        if hit is not None:
            return hit
        ok = self._decide(subject)
        if len(self._cache) < 10_000:
            self._cache[subject] = ok
        return ok

    def learn_denied(self, subject: str) -> None:
        """The server refused a publish we allowed: refuse it up front from now on."""
        self._cache[subject] = False

    def _decide(self, subject: str) -> bool:
        for pattern in self.deny:
            if subject_matches(pattern, subject):
                return False
        if not self.restricted:
            return True
        return any(subject_matches(pattern, subject) for pattern in self.allow)

    def __repr__(self) -> str:
        return f"Permissions(allow={self.allow!r}, deny={self.deny!r})"


def jwt_from_creds(text: str) -> str:
    """The user JWT of a ``.creds`` file (the line after the BEGIN marker)."""
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        if line == _JWT_BEGIN:
            for candidate in lines[i + 1 :]:
                if candidate:
                    return candidate
    raise ValueError("no user JWT in creds file")


def decode_claims(jwt: str) -> dict[str, object]:
    parts = jwt.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    claims = json.loads(base64.urlsafe_b64decode(payload))
    if not isinstance(claims, dict):
        raise ValueError("JWT claims are not an object")
    return claims


def from_claims(claims: dict[str, object]) -> Permissions:
    nats = claims.get("nats")
    pub: object = nats.get("pub") if isinstance(nats, dict) else None
    if not isinstance(pub, dict):
        return Permissions.allow_all()
    allow = pub.get("allow") or []
    deny = pub.get("deny") or []
    if not isinstance(allow, list) or not isinstance(deny, list):
        raise ValueError("pub.allow/deny must be lists")
    return Permissions([str(a) for a in allow], [str(d) for d in deny])


def allow_list(nats: object, kind: str) -> tuple[str, ...]:
    """``<kind>.allow`` (``pub`` or ``sub``) of a JWT's ``nats`` claims; () when absent."""
    section = nats.get(kind) if isinstance(nats, dict) else None
    allow = section.get("allow") if isinstance(section, dict) else None
    return tuple(str(a) for a in allow) if isinstance(allow, list) else ()


def subscribe_allow(claims: dict[str, object]) -> tuple[str, ...]:
    """The JWT's ``sub.allow`` list: where this sidecar serves requests from."""
    return allow_list(claims.get("nats"), "sub")


def seed_from_creds(text: str) -> str:
    """The user nkey seed of a ``.creds`` file (the line after its BEGIN marker)."""
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("-----BEGIN USER NKEY SEED"):
            for candidate in lines[i + 1 :]:
                if candidate:
                    if not candidate.startswith("SU"):
                        break
                    return candidate
    raise ValueError("no user nkey seed in creds file")


class Creds:
    """A creds file read once and checked whole: JWT, seed and the permissions in it.

    The NATS connection signs with these in-memory copies, so a reconnect never
    reads a file that is being rewritten.
    """

    __slots__ = ("account", "expires", "issued", "jwt", "permissions", "seed", "subscribe")

    def __init__(self, text: str) -> None:
        self.jwt = jwt_from_creds(text)
        self.seed = seed_from_creds(text)
        claims = decode_claims(self.jwt)
        self.permissions = from_claims(claims)
        self.subscribe = subscribe_allow(claims)
        #: The account that signed the JWT: it also signs our route tables.
        self.account = str(claims.get("iss", ""))
        #: Unix seconds (0: no expiry); in the metrics, so an alert sees a
        #: renewal that did not come before NATS drops the connection.
        self.expires = _seconds(claims.get("exp"))
        self.issued = _seconds(claims.get("iat"))

    @classmethod
    def read(cls, path: str) -> Creds:
        with open(path, encoding="utf-8") as f:
            creds = cls(f.read())
        logger.info("creds loaded from %s: %r", path, creds.permissions)
        return creds

    def user_jwt(self) -> bytearray:
        return bytearray(self.jwt.encode())

    def sign(self, nonce: str) -> bytes:
        import nkeys

        kp = nkeys.from_seed(bytearray(self.seed.encode()))
        try:
            return base64.b64encode(kp.sign(nonce.encode()))
        finally:
            kp.wipe()


def _seconds(value: object) -> int:
    """A JWT time claim as Unix seconds; 0 when absent or not a number."""
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def from_creds_file(path: str) -> Permissions:
    return Creds.read(path).permissions
