"""NKey key pairs for the operator, accounts and users.

A thin typed layer over ``nkeys``: it creates seeds (``nkeys`` only decodes
them), exposes public keys as ``str`` and can verify a signature against a
bare public key, which ``nkeys`` cannot do without the seed.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from dataclasses import dataclass
from enum import Enum

import nacl.exceptions
import nacl.signing
import nkeys

log = logging.getLogger(__name__)


class Role(Enum):
    """What a key identifies; the value is the nkeys prefix byte."""

    OPERATOR = nkeys.PREFIX_BYTE_OPERATOR
    ACCOUNT = nkeys.PREFIX_BYTE_ACCOUNT
    USER = nkeys.PREFIX_BYTE_USER

    @property
    def letter(self) -> str:
        """First character of a public key of this role (O, A or U)."""
        return {Role.OPERATOR: "O", Role.ACCOUNT: "A", Role.USER: "U"}[self]


class NKeyError(ValueError):
    """A seed or public key that is malformed or of the wrong role."""


@dataclass(frozen=True)
class Key:
    """A signing key pair (seed known) of one role."""

    seed: str
    public: str
    role: Role

    @classmethod
    def create(cls, role: Role) -> Key:
        seed = nkeys.encode_seed(os.urandom(32), role.value).decode()
        return cls.from_seed(seed, role)

    @classmethod
    def from_seed(cls, seed: str, role: Role | None = None) -> Key:
        try:
            prefix, _ = nkeys.decode_seed(seed.strip().encode())
            kp = nkeys.from_seed(bytearray(seed.strip().encode()))
            public = kp.public_key.decode()
        except (nkeys.NkeysError, binascii.Error, ValueError) as exc:
            raise NKeyError(f"not a valid nkey seed: {exc}") from exc
        found = Role(prefix)
        if role is not None and found is not role:
            raise NKeyError(f"seed is a {found.name.lower()} key, wanted {role.name.lower()}")
        return cls(seed=seed.strip(), public=public, role=found)

    def sign(self, data: bytes) -> bytes:
        kp = nkeys.from_seed(bytearray(self.seed.encode()))
        sig: bytes = kp.sign(data)
        return sig

    def __repr__(self) -> str:
        # Never print the seed: reprs end up in logs and assertion messages.
        return f"Key({self.role.name}, {self.public})"


def decode_public(public: str) -> tuple[Role, bytes]:
    """Role and raw ed25519 key of an encoded public key (checksum verified)."""
    try:
        raw = base64.b32decode(public + "=" * (-len(public) % 8))
    except (binascii.Error, ValueError) as exc:
        raise NKeyError(f"not a public nkey: {public!r}") from exc
    if len(raw) != 35:
        raise NKeyError(f"not a public nkey: {public!r}")
    body, crc = raw[:-2], raw[-2:]
    if nkeys.crc16(bytearray(body)).to_bytes(2, "little") != crc:
        raise NKeyError(f"bad checksum in public nkey {public!r}")
    try:
        role = Role(body[0])
    except ValueError as exc:
        raise NKeyError(f"public nkey {public!r} is not an operator/account/user key") from exc
    return role, bytes(body[1:])


def verify(public: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``data`` was made by the key ``public``."""
    _, raw = decode_public(public)
    try:
        nacl.signing.VerifyKey(raw).verify(data, signature)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


def is_public(value: str, role: Role) -> bool:
    try:
        found, _ = decode_public(value)
    except NKeyError:
        return False
    return found is role


class KeyRing:
    """Account and user keys by name, created on first use.

    The operator persists :meth:`dump` (seeds!) in a Secret and loads it back;
    account keys must be stable, since every import names the exporter's
    account public key and every user JWT is signed by its account.
    """

    def __init__(self, seeds: dict[str, str] | None = None) -> None:
        self._seeds: dict[str, str] = dict(seeds or {})
        self.created: list[str] = []

    @staticmethod
    def account_slot(namespace: str) -> str:
        return f"account.{namespace}"

    @staticmethod
    def user_slot(namespace: str, resource: str) -> str:
        return f"user.{namespace}.{resource}"

    def _get(self, slot: str, role: Role) -> Key:
        seed = self._seeds.get(slot)
        if seed is None:
            key = Key.create(role)
            self._seeds[slot] = key.seed
            self.created.append(slot)
            log.info("created %s key %s for %s", role.name.lower(), key.public, slot)
            return key
        return Key.from_seed(seed, role)

    def account(self, namespace: str) -> Key:
        return self._get(self.account_slot(namespace), Role.ACCOUNT)

    def existing_account(self, namespace: str) -> Key | None:
        """The namespace's account key if one was made; never creates one."""
        seed = self._seeds.get(self.account_slot(namespace))
        return Key.from_seed(seed, Role.ACCOUNT) if seed is not None else None

    def namespaces(self) -> list[str]:
        """The namespaces that have an account key."""
        prefix = self.account_slot("")
        return sorted(slot[len(prefix) :] for slot in self._seeds if slot.startswith(prefix))

    def accounts_by_key(self) -> dict[str, str]:
        """``{account public key: namespace}`` for every namespace account."""
        out = {}
        for namespace in self.namespaces():
            key = self.existing_account(namespace)
            if key is not None:
                out[key.public] = namespace
        return out

    def user(self, namespace: str, resource: str) -> Key:
        return self._get(self.user_slot(namespace, resource), Role.USER)

    def rotate_user(self, namespace: str, resource: str) -> tuple[Key | None, Key]:
        """Replace a user key: ``(old, new)``; the old one should be revoked."""
        slot = self.user_slot(namespace, resource)
        old = self._seeds.pop(slot, None)
        return (Key.from_seed(old, Role.USER) if old else None), self.user(namespace, resource)

    def forget(self, slot: str) -> None:
        self._seeds.pop(slot, None)

    def dump(self) -> dict[str, str]:
        return dict(self._seeds)
