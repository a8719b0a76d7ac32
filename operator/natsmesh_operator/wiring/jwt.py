"""A small NATS JWT (v2) encoder and decoder.

Why our own and not the PyPI ``nats-jwt`` package: we need five claim shapes
(operator, account, user, activation-free exports/imports, the resolver's
delete request), the format is tiny (a fixed header, JSON claims, an ed25519
signature by an nkey), and the claim field names are exactly those of
``github.com/nats-io/jwt/v2``. A dependency would add an unpinned surface for
something we can test completely here; this module is covered by unit tests
(round trip, tamper detection) and by every integration test, because
nats-server itself verifies each token we produce.

Format: ``b64url(header).b64url(claims).b64url(sig)`` without padding, the
header ``{"typ":"JWT","alg":"ed25519-nkey"}``, the signature over the first
two parts. ``jti`` is a hash of the claims so equal content gives an equal id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from natsmesh_operator.wiring.keys import Key, NKeyError, verify

log = logging.getLogger(__name__)

HEADER: dict[str, str] = {"typ": "JWT", "alg": "ed25519-nkey"}
#: Claims that change on every encoding; ignored when comparing content.
VOLATILE = frozenset({"iat", "jti"})

Claims = dict[str, Any]


class JwtError(ValueError):
    """A token that does not parse or whose signature does not verify."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise JwtError(f"bad base64url segment: {exc}") from exc


def _dumps(value: Any) -> bytes:
    # Compact and key-sorted: the same claims always give the same bytes,
    # which keeps jti stable and makes tokens diffable in tests.
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def encode(claims: Mapping[str, Any], signer: Key, *, issued_at: int | None = None) -> str:
    """Sign ``claims`` with ``signer``; ``iss`` is set to the signer's public key."""
    body: Claims = {k: v for k, v in claims.items() if k != "jti"}
    body["iss"] = signer.public
    body["iat"] = int(time.time()) if issued_at is None else issued_at
    body["jti"] = base64.b32encode(hashlib.sha256(_dumps(body)).digest()).decode().rstrip("=")
    signing_input = f"{_b64(_dumps(HEADER))}.{_b64(_dumps(body))}"
    signature = signer.sign(signing_input.encode())
    return f"{signing_input}.{_b64(signature)}"


@dataclass(frozen=True)
class Decoded:
    header: dict[str, Any]
    claims: Claims

    @property
    def issuer(self) -> str:
        return str(self.claims.get("iss", ""))

    @property
    def subject(self) -> str:
        return str(self.claims.get("sub", ""))

    @property
    def nats(self) -> dict[str, Any]:
        value = self.claims.get("nats", {})
        return value if isinstance(value, dict) else {}

    @property
    def expires(self) -> int | None:
        exp = self.claims.get("exp")
        return int(exp) if isinstance(exp, int | float) and exp > 0 else None


def decode(token: str, *, verify_signature: bool = True) -> Decoded:
    """Parse a token; by default also check it is signed by its ``iss``."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise JwtError("a JWT has three dot-separated parts")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
    except json.JSONDecodeError as exc:
        raise JwtError(f"JWT part is not JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise JwtError("JWT header and claims must be JSON objects")
    if header.get("alg") not in {"ed25519-nkey", "ed25519"}:
        raise JwtError(f"unsupported JWT alg {header.get('alg')!r}")
    if verify_signature:
        issuer = claims.get("iss")
        if not isinstance(issuer, str):
            raise JwtError("JWT has no issuer")
        try:
            ok = verify(issuer, f"{parts[0]}.{parts[1]}".encode(), _unb64(parts[2]))
        except NKeyError as exc:
            raise JwtError(f"JWT issuer is not a public nkey: {exc}") from exc
        if not ok:
            raise JwtError("JWT signature does not verify")
    return Decoded(header=header, claims=claims)


def content(claims: Mapping[str, Any]) -> Claims:
    """The claims without the parts that change on every encoding."""
    return {k: v for k, v in claims.items() if k not in VOLATILE}


def same_content(token: str, claims: Mapping[str, Any], issuer: str) -> bool:
    """Whether ``token`` already says what ``claims`` would, signed by ``issuer``.

    Used to skip re-pushing (or re-issuing) a JWT whose meaning is unchanged.
    """
    try:
        current = decode(token)
    except JwtError:
        return False
    wanted = content(claims)
    wanted["iss"] = issuer
    return content(current.claims) == wanted


def creds(user_jwt: str, user_seed: str) -> str:
    """A creds file body exactly as ``nsc generate creds`` writes it."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n"
        "\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n"
        "\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed}\n"
        "------END USER NKEY SEED------\n"
        "\n"
        "*************************************************************\n"
    )


def parse_creds(text: str) -> tuple[str, str]:
    """``(jwt, seed)`` from a creds file body; the inverse of :func:`creds`."""
    blocks: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("-----BEGIN") and i + 1 < len(lines):
            blocks.append(lines[i + 1].strip())
    if len(blocks) != 2:
        raise JwtError("creds must hold a JWT block and a seed block")
    return blocks[0], blocks[1]
