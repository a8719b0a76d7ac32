"""Each meshed namespace's tap creds: the Secret ``natsmesh-tap`` that ``natsmesh tap`` reads.

The tap user may start, renew and stop taps of its namespace's services and
read their records, nothing else (:func:`~natsmesh_operator.wiring.permissions.tap_permissions`).
Kubernetes RBAC on this Secret is therefore the gate: whoever may ``get``
Secrets in a namespace may tap it (they could read every service's creds
there anyway). The Secret holds the creds and the NATS URL the operator uses,
so a tenant needs no access to the release namespace.

No owner: it belongs to the namespace, not to one NatsService. A pass issues
it for every namespace with a NatsService and, once the last one is gone,
revokes its user and deletes it. It is renewed like a service's creds (same
key, 75 % of its life); a re-issue that narrows revokes the old key at once
(no sidecar holds it, only short-lived CLI sessions). A Secret deleted by hand
comes back on the next pass with a new user; the deleted one's key stays
valid until it expires (``NATSMESH_CREDS_TTL_SECONDS``): docs/security.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lightkube import AsyncClient
from lightkube.resources.core_v1 import Secret

from natsmesh_operator.handlers import kube
from natsmesh_operator.watched import Watched
from natsmesh_operator.webhook.inject import CREDS_KEY
from natsmesh_operator.wiring import jwt, users
from natsmesh_operator.wiring.keys import Key, Role, is_public
from natsmesh_operator.wiring.plan import TAP_USER, UserPlan

__all__ = ["LABEL_TAP", "NATS_URL_KEY", "TAP_USER", "TapCredsReport", "sync", "verified_user"]

logger = logging.getLogger(__name__)

LABEL_TAP = "natsmesh.io/tap"
NATS_URL_KEY = "nats-url"
#: Why :func:`~natsmesh_operator.wiring.users.needs_reissue` may keep the user
#: key: the JWT verified against the account, only its content or age differs.
KEEP_KEY = frozenset({"permissions changed", "expires soon", "expiry policy changed"})


@dataclass
class TapCredsReport:
    issued: list[str] = field(default_factory=list)
    """Namespaces whose Secret was (re)written."""
    stale: list[str] = field(default_factory=list)
    """Namespaces without services whose Secret goes once revocations are pushed."""
    errors: dict[str, str] = field(default_factory=dict)


def verified_user(creds: str | None, account: Key | None) -> str | None:
    """The user key of creds whose JWT ``account`` signed, else None."""
    if not creds or account is None:
        return None
    try:
        token, _ = jwt.parse_creds(creds)
        decoded = jwt.decode(token)
    except ValueError:  # JwtError is one
        return None
    user = decoded.subject
    if decoded.issuer != account.public or not is_public(str(user), Role.USER):
        return None
    return str(user)


async def list_tap_secrets(client: AsyncClient, watched: Watched) -> dict[str, Secret]:
    return {
        str(s.metadata.namespace): s
        async for s in kube.list_watched(client, Secret, watched, labels={LABEL_TAP: "true"})
        if s.metadata is not None and s.metadata.name == TAP_USER
    }


async def sync(
    client: AsyncClient,
    watched: Watched,
    tap_users: Iterable[UserPlan],
    *,
    account: Callable[[str], Key],
    existing_account: Callable[[str], Key | None],
    nats_url: str,
    ttl_seconds: int | None,
    revoke: Callable[[str, str, str], None],
) -> TapCredsReport:
    """Issue or renew each tap user's Secret; revoke the users of namespaces
    without services (their Secrets are in ``stale``, deleted by the caller
    after the revocation is pushed)."""
    report = TapCredsReport()
    existing = await list_tap_secrets(client, watched)
    wanted = {u.namespace: u for u in tap_users}
    for ns, user in sorted(wanted.items()):
        try:
            if await _ensure(
                client, user, existing.get(ns), account(ns), nats_url, ttl_seconds, revoke
            ):
                report.issued.append(ns)
        except Exception as exc:  # one namespace's Secret, not the pass
            logger.exception("tap creds of %s", ns)
            report.errors[ns] = f"{type(exc).__name__}: {exc}"
    for ns, secret in sorted(existing.items()):
        if ns in wanted:
            continue
        creds = kube.decode_secret(secret).get(CREDS_KEY)
        old = verified_user(creds, existing_account(ns))
        if old is None:
            continue  # not one we issued: not ours to revoke or delete
        revoke(ns, TAP_USER, old)
        report.stale.append(ns)
    return report


async def _ensure(
    client: AsyncClient,
    user: UserPlan,
    secret: Secret | None,
    account: Key,
    nats_url: str,
    ttl_seconds: int | None,
    revoke: Callable[[str, str, str], None],
) -> bool:
    ns = user.namespace
    data = kube.decode_secret(secret) if secret is not None else {}
    current = data.get(CREDS_KEY)
    why = users.needs_reissue(current, user, account.public, ttl_seconds=ttl_seconds)
    if not why and data.get(NATS_URL_KEY) == nats_url:
        return False
    held = users.held(current)
    user_key = None
    if why in KEEP_KEY and held is not None and held.issuer == account.public:
        if held.permissions is not None and user.permissions.narrows(held.permissions):
            revoke(ns, TAP_USER, held.public)
        else:
            user_key = held.key
    if not why:  # only the URL changed
        user_key = held.key if held is not None else None
    issued = users.issue(user, account, user_key=user_key, ttl_seconds=ttl_seconds)
    await kube.write_secret(
        client,
        TAP_USER,
        ns,
        {CREDS_KEY: issued.creds, NATS_URL_KEY: nats_url},
        labels={LABEL_TAP: "true"},
        annotations={kube.ANNOTATION_ISSUED_USER: issued.public},
    )
    logger.info("issued tap creds for %s (%s)", ns, why or "NATS URL changed")
    return True
