"""``natsmesh bootstrap``: the NATS operator, system account and server config.

Creates (or, if the output already holds them, re-uses: never rotate the root
of trust by accident) the operator key pair and JWT, the system account and a
system user, and an ``resolver.conf`` fragment for nats-server in operator mode
with the full resolver (accounts pushed at run time, kept in the resolver's
directory, deletions allowed) and the system account preloaded.

Output: files in ``--out`` (tests and local runs), or with ``--secret NAME`` a
Kubernetes Secret manifest on stdout (the chart's hook applies it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
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
    "operator_seed": "operator.nk",
    "operator_jwt": "operator.jwt",
    "system_account_seed": "sys.nk",
    "system_account_jwt": "sys.jwt",
    "system_user_creds": "sys.creds",
    "auth_conf": "resolver.conf",
}


@dataclass(frozen=True)
class Bootstrap:
    operator: Key
    operator_jwt: str
    system_account: Key
    system_account_jwt: str
    system_user_creds: str
    resolver_dir: str

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
        return {
            FILES["operator_seed"]: self.operator.seed + "\n",
            FILES["operator_jwt"]: self.operator_jwt + "\n",
            FILES["system_account_seed"]: self.system_account.seed + "\n",
            FILES["system_account_jwt"]: self.system_account_jwt + "\n",
            FILES["system_user_creds"]: self.system_user_creds,
            FILES["auth_conf"]: self.auth_conf(),
        }

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for name, body in self.files().items():
            path = out / name
            path.write_text(body)
            if name.endswith((".nk", ".creds")):
                path.chmod(0o600)

    @classmethod
    def load(cls, out: Path, resolver_dir: str | None = None) -> Bootstrap:
        def read(key: str) -> str:
            return (out / FILES[key]).read_text().strip()

        conf = (out / FILES["auth_conf"]).read_text()
        found = _resolver_dir_of(conf)
        return cls(
            operator=Key.from_seed(read("operator_seed"), Role.OPERATOR),
            operator_jwt=read("operator_jwt"),
            system_account=Key.from_seed(read("system_account_seed"), Role.ACCOUNT),
            system_account_jwt=read("system_account_jwt"),
            system_user_creds=(out / FILES["system_user_creds"]).read_text(),
            resolver_dir=resolver_dir or found,
        )


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
    operator: Key | None = None,
    system_account: Key | None = None,
) -> Bootstrap:
    """Sign the operator, system account and system user (re-using given keys)."""
    op = operator or Key.create(Role.OPERATOR)
    sys_acc = system_account or Key.create(Role.ACCOUNT)
    op_jwt = jwt.encode(operator_claims(operator_name, op.public, sys_acc.public), op)
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
        operator=op,
        operator_jwt=op_jwt,
        system_account=sys_acc,
        system_account_jwt=sys_jwt,
        system_user_creds=jwt.creds(user_jwt, user.seed),
        resolver_dir=resolver_dir,
    )


def create_or_load(
    out: Path, *, operator_name: str = "natsmesh", resolver_dir: str | None = None
) -> Bootstrap:
    """Re-use the keys already in ``out`` (idempotent); create them otherwise."""
    if (out / FILES["operator_seed"]).exists():
        existing = Bootstrap.load(out)
        if resolver_dir is None or resolver_dir == existing.resolver_dir:
            return existing
        # Same root of trust, another resolver directory: re-sign, keep keys.
        return create(
            operator=existing.operator,
            system_account=existing.system_account,
            resolver_dir=resolver_dir,
            operator_name=operator_name,
        )
    return create(operator_name=operator_name, resolver_dir=resolver_dir or "/data/jwt")


def secret_manifest(boot: Bootstrap, name: str, namespace: str) -> str:
    """A Kubernetes Secret holding every bootstrap file (JSON is valid YAML)."""
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "natsmesh"},
        },
        "type": "Opaque",
        "stringData": boot.files(),
    }
    return json.dumps(manifest, indent=2) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="natsmesh bootstrap", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="directory to write the files into")
    parser.add_argument("--secret", metavar="NAME", help="print a Secret manifest instead")
    parser.add_argument("--namespace", default="natsmesh", help="namespace of the Secret")
    parser.add_argument("--operator-name", default="natsmesh")
    parser.add_argument(
        "--resolver-dir", default="/data/jwt", help="where nats-server keeps account JWTs"
    )
    args = parser.parse_args(argv)
    if not args.out and not args.secret:
        parser.error("give --out DIR and/or --secret NAME")
    if args.out:
        boot = create_or_load(
            args.out, operator_name=args.operator_name, resolver_dir=args.resolver_dir
        )
        boot.write(args.out)
        print(f"wrote {', '.join(sorted(FILES.values()))} to {args.out}", file=sys.stderr)
    else:
        boot = create(operator_name=args.operator_name, resolver_dir=args.resolver_dir)
    if args.secret:
        sys.stdout.write(secret_manifest(boot, args.secret, args.namespace))
    print(
        f"operator {boot.operator.public}, system account {boot.system_account.public}",
        file=sys.stderr,
    )
    return 0
