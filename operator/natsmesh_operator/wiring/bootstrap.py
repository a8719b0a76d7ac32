"""``natsmesh bootstrap``: the NATS operator, system account and server config.

Two operator keys: the *root* (identity key) signs only the operator JWT and
the system account, and stays offline; the operator JWT lists a *signing key*
(``signing_keys``), which the running natsmesh operator holds and signs every
namespace account with. Losing the signing key is repaired with the root
(:func:`rotate_signing_key`); nobody but the admin ever needs the root.

Creates (or, if the output already holds them, re-uses: never rotate the root
of trust by accident) both keys, the operator JWT, the system account and a
system user, and an ``resolver.conf`` fragment for nats-server in operator mode
with the full resolver (accounts pushed at run time, kept in the resolver's
directory, deletions allowed) and the system account preloaded.

Output: files in ``--out`` (tests and local runs; the root goes to
``--root-out``, by default ``<out>/operator.nk``), or with ``--secret NAME`` a
Kubernetes Secret manifest on stdout (then ``--root-out`` is required: the
root is never part of the Secret).

A bootstrap made before signing keys (``operator.nk``, no ``signing.nk``) is
still read: the root then signs accounts, as it did, until the admin runs
``natsmesh bootstrap rotate-signing-key``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from natsmesh_operator.wiring import jwt
from natsmesh_operator.wiring.accounts import (
    operator_claims,
    system_account_claims,
)
from natsmesh_operator.wiring.keys import Key, Role

log = logging.getLogger(__name__)

SYSTEM_USER_NAME = "natsmesh-system"

FILES = {
    "signing_seed": "signing.nk",
    "operator_jwt": "operator.jwt",
    "system_account_seed": "sys.nk",
    "system_account_jwt": "sys.jwt",
    "system_user_creds": "sys.creds",
    "auth_conf": "resolver.conf",
}
ROOT_FILE = "operator.nk"
"""The root seed's file name: in ``--root-out``, the root Secret, and in
bootstraps made before signing keys (where the operator still reads it)."""


class BootstrapError(ValueError):
    """Bootstrap material that is missing or does not fit together."""


@dataclass(frozen=True)
class Bootstrap:
    operator_public: str
    """The root's public key: the operator JWT's subject."""
    signing_key: Key
    """What the running operator signs accounts (and deletions) with."""
    operator_jwt: str
    system_account: Key
    system_account_jwt: str
    system_user_creds: str
    resolver_dir: str
    root: Key | None = None
    """Only when just made, or in a legacy bootstrap; never in :meth:`files`."""

    @property
    def legacy(self) -> bool:
        """Made before signing keys: the root signs accounts itself."""
        return self.signing_key.public == self.operator_public

    def auth_conf(self) -> str:
        """The nats-server config fragment: operator mode, full resolver."""
        return (
            "# natsmesh: operator mode, accounts pushed via $SYS.REQ.CLAIMS.UPDATE\n"
            f"operator: {self.operator_jwt}\n"
            f"system_account: {self.system_account.public}\n"
            "resolver: {\n"
            "  type: full\n"
            f"  dir: {json.dumps(self.resolver_dir)}\n"
            "  allow_delete: true\n"
            '  interval: "2m"\n'
            '  timeout: "5s"\n'
            "}\n"
            "resolver_preload: {\n"
            f"  {self.system_account.public}: {self.system_account_jwt}\n"
            "}\n"
        )

    def files(self) -> dict[str, str]:
        """What the operator reads (the bootstrap Secret): no root seed.

        A legacy bootstrap has no signing key of its own, so its root seed is
        what the operator signs with and stays (under its old name).
        """
        seed_file = ROOT_FILE if self.legacy else FILES["signing_seed"]
        return {
            seed_file: self.signing_key.seed + "\n",
            FILES["operator_jwt"]: self.operator_jwt + "\n",
            FILES["system_account_seed"]: self.system_account.seed + "\n",
            FILES["system_account_jwt"]: self.system_account_jwt + "\n",
            FILES["system_user_creds"]: self.system_user_creds,
            FILES["auth_conf"]: self.auth_conf(),
        }

    def write(self, out: Path, root_out: Path | None = None) -> None:
        """The operator's files into ``out``; the root (if known) to ``root_out``."""
        out.mkdir(parents=True, exist_ok=True)
        for name, body in self.files().items():
            write_private(out / name, body, private=name.endswith((".nk", ".creds")))
        if self.root is not None and not self.legacy:
            write_private(root_out or out / ROOT_FILE, self.root.seed + "\n", private=True)

    @classmethod
    def from_files(cls, data: Mapping[str, str], *, resolver_dir: str | None = None) -> Bootstrap:
        """Read the bootstrap Secret's (or directory's) files.

        ``signing.nk`` is the day-to-day key; without it (a bootstrap made
        before signing keys) ``operator.nk`` is both root and signer.
        """
        signing = data.get(FILES["signing_seed"])
        needed = [f for k, f in FILES.items() if k != "signing_seed"]
        missing = [f for f in needed if f not in data]
        if signing is None and ROOT_FILE not in data:
            missing.insert(0, f"{FILES['signing_seed']} (or {ROOT_FILE})")
        if missing:
            raise BootstrapError(f"bootstrap lacks {', '.join(missing)}: run natsmesh bootstrap")
        operator_jwt = data[FILES["operator_jwt"]].strip()
        try:
            op = jwt.decode(operator_jwt)
        except jwt.JwtError as exc:
            raise BootstrapError(f"{FILES['operator_jwt']} is not a JWT: {exc}") from exc
        root: Key | None = None
        if signing is None:
            signing_key = Key.from_seed(data[ROOT_FILE], Role.OPERATOR)
            root = signing_key
        else:
            signing_key = Key.from_seed(signing, Role.OPERATOR)
            if ROOT_FILE in data:
                root = Key.from_seed(data[ROOT_FILE], Role.OPERATOR)
        trusted = {op.subject, *(op.nats.get("signing_keys") or [])}
        if signing_key.public not in trusted:
            raise BootstrapError(
                f"signing key {signing_key.public} is not in {FILES['operator_jwt']} "
                f"(operator {op.subject}): rotate-signing-key did not finish"
            )
        if root is not None and root.public != op.subject:
            raise BootstrapError(f"root key {root.public} is not operator {op.subject}")
        return cls(
            operator_public=op.subject,
            signing_key=signing_key,
            operator_jwt=operator_jwt,
            system_account=Key.from_seed(data[FILES["system_account_seed"]], Role.ACCOUNT),
            system_account_jwt=data[FILES["system_account_jwt"]].strip(),
            system_user_creds=data[FILES["system_user_creds"]],
            resolver_dir=resolver_dir or _resolver_dir_of(data[FILES["auth_conf"]]),
            root=root,
        )

    @classmethod
    def load(
        cls, out: Path, resolver_dir: str | None = None, root_out: Path | None = None
    ) -> Bootstrap:
        names = [*FILES.values(), ROOT_FILE]
        data = {n: (out / n).read_text() for n in names if (out / n).exists()}
        root_file = root_out or out / ROOT_FILE
        if root_file.exists():
            data[ROOT_FILE] = root_file.read_text()
        return cls.from_files(data, resolver_dir=resolver_dir)


def write_private(path: Path, body: str, *, private: bool = True) -> None:
    """Write ``body``; ``private``: readable by the owner only (seeds, creds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    if private:
        path.chmod(0o600)


def _resolver_dir_of(conf: str) -> str:
    for line in conf.splitlines():
        stripped = line.strip()
        if stripped.startswith("dir:"):
            value: str = json.loads(stripped[len("dir:") :].strip())
            return value
    return "/data/jwt"


def create(
    *,
    operator_name: str = "natsmesh",
    resolver_dir: str = "/data/jwt",
    root: Key | None = None,
    signing_key: Key | None = None,
    system_account: Key | None = None,
) -> Bootstrap:
    """Sign the operator, system account and system user (re-using given keys)."""
    op = root or Key.create(Role.OPERATOR)
    signer = signing_key or Key.create(Role.OPERATOR)
    sys_acc = system_account or Key.create(Role.ACCOUNT)
    op_jwt = jwt.encode(
        operator_claims(operator_name, op.public, sys_acc.public, [signer.public]), op
    )
    sys_jwt = jwt.encode(system_account_claims(sys_acc.public), op)
    user = Key.create(Role.USER)
    # The system user may do anything in the system account: it only pushes
    # and deletes account JWTs and reads server events.
    user_jwt = jwt.encode(
        {
            "sub": user.public,
            "name": SYSTEM_USER_NAME,
            "nats": {"type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1},
        },
        sys_acc,
    )
    return Bootstrap(
        operator_public=op.public,
        signing_key=signer,
        operator_jwt=op_jwt,
        system_account=sys_acc,
        system_account_jwt=sys_jwt,
        system_user_creds=jwt.creds(user_jwt, user.seed),
        resolver_dir=resolver_dir,
        root=op,
    )


def rotate_signing_key(boot: Bootstrap, root: Key) -> Bootstrap:
    """A new signing key, and an operator JWT that trusts only it.

    Accounts signed by the old key are refused once the servers run with the
    new operator JWT; the operator re-signs them all on its next pass (their
    issuer differs), so there is nothing else to re-issue. Also turns a legacy
    bootstrap (root as signer) into one with a signing key.
    """
    if root.public != boot.operator_public:
        raise BootstrapError(
            f"{root.public} is not the root of operator {boot.operator_public}: wrong --root file"
        )
    op = jwt.decode(boot.operator_jwt)
    signer = Key.create(Role.OPERATOR)
    claims = operator_claims(
        str(op.claims.get("name", "natsmesh")),
        root.public,
        boot.system_account.public,
        [signer.public],
    )
    log.info("rotated the operator signing key %s -> %s", boot.signing_key.public, signer.public)
    return replace(boot, signing_key=signer, operator_jwt=jwt.encode(claims, root), root=root)


def create_or_load(
    out: Path,
    *,
    operator_name: str = "natsmesh",
    resolver_dir: str | None = None,
    root_out: Path | None = None,
) -> Bootstrap:
    """Re-use the keys already in ``out`` (idempotent); create them otherwise."""
    if any((out / n).exists() for n in (FILES["signing_seed"], ROOT_FILE)):
        existing = Bootstrap.load(out, root_out=root_out)
        # The resolver directory is only in resolver.conf: no JWT to re-sign.
        return replace(existing, resolver_dir=resolver_dir or existing.resolver_dir)
    return create(operator_name=operator_name, resolver_dir=resolver_dir or "/data/jwt")


def secret_manifest(files: Mapping[str, str], name: str, namespace: str) -> str:
    """A Kubernetes Secret holding ``files`` (JSON is valid YAML)."""
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "natsmesh"},
        },
        "type": "Opaque",
        "stringData": dict(files),
    }
    return json.dumps(manifest, indent=2) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="natsmesh bootstrap", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="directory to write the files into")
    parser.add_argument("--secret", metavar="NAME", help="print a Secret manifest instead")
    parser.add_argument("--namespace", default="natsmesh", help="namespace of the Secret")
    parser.add_argument(
        "--root-out",
        type=Path,
        metavar="FILE",
        help=f"where the root seed goes (default <out>/{ROOT_FILE}); keep it offline",
    )
    parser.add_argument("--operator-name", default="natsmesh")
    parser.add_argument(
        "--resolver-dir", default="/data/jwt", help="where nats-server keeps account JWTs"
    )
    args = parser.parse_args(argv)
    if not args.out and not args.secret:
        parser.error("give --out DIR and/or --secret NAME")
    if args.secret and not args.out and not args.root_out:
        parser.error("--secret needs --root-out FILE: the root seed is never put in the Secret")
    if args.out:
        boot = create_or_load(
            args.out,
            operator_name=args.operator_name,
            resolver_dir=args.resolver_dir,
            root_out=args.root_out,
        )
        boot.write(args.out, args.root_out)
        print(f"wrote {', '.join(sorted(boot.files()))} to {args.out}", file=sys.stderr)
    else:
        boot = create(operator_name=args.operator_name, resolver_dir=args.resolver_dir)
        assert boot.root is not None
        write_private(args.root_out, boot.root.seed + "\n", private=True)
    if args.root_out and boot.root is not None:
        print(f"root seed in {args.root_out}: move it offline", file=sys.stderr)
    if args.secret:
        sys.stdout.write(secret_manifest(boot.files(), args.secret, args.namespace))
    print(
        f"operator {boot.operator_public}, signing key {boot.signing_key.public}, "
        f"system account {boot.system_account.public}",
        file=sys.stderr,
    )
    return 0
