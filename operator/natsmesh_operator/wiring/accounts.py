"""Account JWT claims: one account per namespace, plus the system account.

Every account we sign carries the tag :data:`MANAGED_TAG`, so pruning only
ever deletes accounts natsmesh created. JetStream is enabled by giving the
account non-zero storage limits (NATS has no separate on/off switch in the
account JWT).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from natsmesh_operator.wiring.desired import AccountLimits
from natsmesh_operator.wiring.jwt import Claims
from natsmesh_operator.wiring.plan import AccountPlan

log = logging.getLogger(__name__)

MANAGED_TAG = "natsmesh.io/managed"
SYSTEM_ACCOUNT_NAME = "SYS"


def limits_claims(limits: AccountLimits | None) -> dict[str, Any]:
    """The ``nats.limits`` object; None is the system account (no JetStream)."""
    out: dict[str, Any] = {
        "subs": -1,
        "data": -1,
        "payload": -1,
        "imports": -1,
        "exports": -1,
        "wildcards": True,
        "conn": -1,
        "leaf": -1,
    }
    if limits is not None:
        out.update(
            conn=limits.connections,
            subs=limits.subscriptions,
            payload=limits.payload,
            mem_storage=limits.mem_storage,
            disk_storage=limits.disk_storage,
            streams=limits.streams,
            consumer=limits.consumers,
        )
    return out


def account_claims(
    plan: AccountPlan,
    account_public: str,
    account_of: Callable[[str], str],
    *,
    revocations: Mapping[str, int] | None = None,
) -> Claims:
    """Claims of a namespace account; ``account_of(ns)`` gives other accounts' keys."""
    nats: dict[str, Any] = {
        "type": "account",
        "version": 2,
        "tags": [MANAGED_TAG],
        "limits": limits_claims(plan.limits),
        "default_permissions": {"pub": {}, "sub": {}},
    }
    if plan.exports:
        nats["exports"] = [
            {
                "name": e.name or e.subject,
                "subject": e.subject,
                "type": e.kind,
                **({"response_type": e.response_type} if e.kind == "service" else {}),
            }
            for e in plan.exports
        ]
    if plan.imports:
        nats["imports"] = [
            {
                "name": i.name or i.subject,
                "subject": i.subject,
                "account": account_of(i.exporter),
                "type": i.kind,
                **({"local_subject": i.local_subject} if i.local_subject else {}),
            }
            for i in plan.imports
        ]
    if revocations:
        # A user JWT issued at or before the given time is refused: rotation
        # revokes the old key so a leaked creds file stops working at once.
        nats["revocations"] = dict(sorted(revocations.items()))
    return {"sub": account_public, "name": plan.namespace, "nats": nats}


def system_account_claims(account_public: str) -> Claims:
    return {
        "sub": account_public,
        "name": SYSTEM_ACCOUNT_NAME,
        "nats": {
            "type": "account",
            "version": 2,
            "tags": [MANAGED_TAG],
            "limits": limits_claims(None),
            "default_permissions": {"pub": {}, "sub": {}},
        },
    }


def operator_claims(
    name: str, operator_public: str, system_account: str, signing_keys: list[str]
) -> Claims:
    """The operator JWT; nats-server accepts accounts issued by the operator
    or by one of ``signing_keys`` (the keys the running operator holds)."""
    return {
        "sub": operator_public,
        "name": name,
        "nats": {
            "type": "operator",
            "version": 2,
            "system_account": system_account,
            "signing_keys": sorted(signing_keys),
        },
    }


def delete_request_claims(signer_public: str, accounts: list[str]) -> Claims:
    """The body of ``$SYS.REQ.CLAIMS.DELETE``: a generic JWT self-signed by the
    operator or one of its signing keys (nats-server accepts either)."""
    return {"sub": signer_public, "nats": {"accounts": sorted(accounts)}}
