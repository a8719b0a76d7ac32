"""User JWTs and creds: one user per NatsService, signed by its namespace account.

Users are not pushed to the servers (the account JWT is what servers trust):
the operator writes the creds into a Secret. :func:`needs_reissue` decides
whether the Secret's current creds still say what the plan says and are not
about to expire, so re-applying an unchanged mesh re-issues nothing.
Rotation is a new user key: the caller revokes the old key in the account
(``revocations`` in :func:`.accounts.account_claims`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from natsmesh_operator.wiring import jwt
from natsmesh_operator.wiring.accounts import MANAGED_TAG
from natsmesh_operator.wiring.keys import Key, Role
from natsmesh_operator.wiring.permissions import Permissions
from natsmesh_operator.wiring.plan import UserPlan

log = logging.getLogger(__name__)

#: Re-issue when less than this fraction of the lifetime is left.
RENEW_FRACTION = 0.25


def managed_user_nats(permissions: Mapping[str, object] | None = None) -> dict[str, object]:
    """The ``nats`` claims of every user we sign: tagged as ours, no limits but
    ``permissions`` (none: everything the account allows)."""
    return {
        "type": "user",
        "version": 2,
        "tags": [MANAGED_TAG],
        "subs": -1,
        "data": -1,
        "payload": -1,
        **(permissions or {}),
    }


def user_claims(user: UserPlan, user_public: str, *, expires_at: int | None = None) -> jwt.Claims:
    nats = managed_user_nats(user.permissions.to_claims())
    claims: jwt.Claims = {"sub": user_public, "name": user.name, "nats": nats}
    if expires_at is not None:
        claims["exp"] = expires_at
    return claims


@dataclass(frozen=True)
class IssuedUser:
    jwt: str
    seed: str
    public: str
    expires: int | None = None

    @property
    def creds(self) -> str:
        return jwt.creds(self.jwt, self.seed)


def issue(
    user: UserPlan,
    account: Key,
    *,
    user_key: Key | None = None,
    ttl_seconds: int | None = None,
    now: int | None = None,
) -> IssuedUser:
    """A signed user JWT (a new key unless ``user_key`` is given: rotation)."""
    key = user_key or Key.create(Role.USER)
    issued = int(time.time()) if now is None else now
    expires = issued + ttl_seconds if ttl_seconds else None
    token = jwt.encode(user_claims(user, key.public, expires_at=expires), account, issued_at=issued)
    log.info("issued user %s (%s), expires %s", user.name, key.public, expires or "never")
    return IssuedUser(jwt=token, seed=key.seed, public=key.public, expires=expires)


@dataclass(frozen=True)
class HeldCreds:
    """What a creds Secret currently holds, as far as re-issuing cares."""

    key: Key
    public: str
    issuer: str
    expires: int | None
    permissions: Permissions | None


def held(creds: str | None) -> HeldCreds | None:
    """The user in a creds file, or None when it is missing or unreadable."""
    if not creds:
        return None
    try:
        token, seed = jwt.parse_creds(creds)
        decoded = jwt.decode(token, verify_signature=False)
        key = Key.from_seed(seed, Role.USER)
    except (jwt.JwtError, ValueError):
        return None
    if key.public != decoded.subject:
        return None
    nats = decoded.claims.get("nats")
    return HeldCreds(
        key=key,
        public=key.public,
        issuer=decoded.issuer,
        expires=decoded.expires,
        permissions=Permissions.from_claims(nats) if isinstance(nats, dict) else None,
    )


def needs_reissue(
    creds_or_jwt: str | None,
    user: UserPlan,
    account_public: str,
    *,
    ttl_seconds: int | None = None,
    now: int | None = None,
) -> str:
    """Why the existing creds must be re-issued, or '' if they are still right."""
    if not creds_or_jwt:
        return "no credentials yet"
    token = creds_or_jwt
    if "BEGIN NATS USER JWT" in creds_or_jwt:
        try:
            token, _ = jwt.parse_creds(creds_or_jwt)
        except jwt.JwtError as exc:
            return f"unreadable creds: {exc}"
    try:
        current = jwt.decode(token)
    except jwt.JwtError as exc:
        return f"unreadable JWT: {exc}"
    if current.issuer != account_public:
        return "signed by another account key"
    wanted = user_claims(user, current.subject)
    have = jwt.content(current.claims)
    have.pop("iss", None)
    have.pop("exp", None)
    if have != wanted:
        return "permissions changed"
    now = int(time.time()) if now is None else now
    exp = current.expires
    if ttl_seconds is None:
        return "" if exp is None else "expiry policy changed"
    if exp is None:
        return "expiry policy changed"
    if exp - now < ttl_seconds * RENEW_FRACTION:
        return "expires soon"
    return ""
