"""Route tables signed by the namespace's account key, checked by the sidecar.

A tenant holding a service's creds cannot write the route bucket directly,
but JetStream publishes on a tenant's behalf to reply subjects the tenant
chooses (a publish ack, a pulled message, a direct get): a pulled message the
tenant stored itself, delivered to ``$KV.natsmesh-routes.<victim>``, would land
in the bucket as the victim's table and redirect its calls. So the operator
signs every value it puts (and every delete) with the account key that also
signs the sidecar's user JWT, and a sidecar with creds applies only what that
key signed. ed25519 is deterministic: the same table always has the same
signature, so the operator's drift check can compare it.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

HEADER = "Natsmesh-Signature"
_DELETE = b"natsmesh-delete:"


def _signed(key: str, value: bytes) -> bytes:
    # The key is part of what is signed: a table valid for one service cannot
    # be replayed under another's key (JetStream's direct get would carry the
    # signature header along).
    return key.encode() + b"\n" + value


def sign_table(sign: Callable[[bytes], bytes], key: str, value: bytes) -> str:
    return base64.urlsafe_b64encode(sign(_signed(key, value))).decode().rstrip("=")


def sign_delete(sign: Callable[[bytes], bytes], key: str) -> str:
    return sign_table(sign, key, _DELETE)


def _signature(header: str | None) -> bytes | None:
    if not header:
        return None
    try:
        return base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
    except (ValueError, binascii.Error):
        return None


def _account_key(account: str) -> bytes | None:
    """The raw ed25519 key of a public account nkey (prefix 'A', CRC-checked)."""
    import nkeys

    try:
        raw = base64.b32decode(account + "=" * (-len(account) % 8))
    except (ValueError, binascii.Error):
        return None
    if len(raw) != 35 or raw[0] != nkeys.PREFIX_BYTE_ACCOUNT:
        return None
    if nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:
        return None
    return raw[1:33]


def verified(account: str, key: str, data: bytes, header: str | None) -> bool:
    """Whether ``header`` is ``account``'s signature over ``data`` stored at ``key``."""
    import nacl.exceptions
    import nacl.signing

    sig = _signature(header)
    raw = _account_key(account)
    if sig is None or raw is None:
        return False
    try:
        nacl.signing.VerifyKey(raw).verify(_signed(key, data), sig)
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True


def verified_delete(account: str, key: str, header: str | None) -> bool:
    return verified(account, key, _DELETE, header)


def is_delete(hdrs: dict[str, str], data: bytes) -> bool:
    """Whether a route-bucket entry is a delete (or purge) marker."""
    return hdrs.get("KV-Operation") in ("DEL", "PURGE") or not data


def entry_verified(account: str, key: str, hdrs: dict[str, str], data: bytes) -> bool:
    """Whether ``account`` signed this entry of ``key``, a value or a delete."""
    sig = hdrs.get(HEADER)
    if is_delete(hdrs, data):
        return verified_delete(account, key, sig)
    return verified(account, key, data, sig)
