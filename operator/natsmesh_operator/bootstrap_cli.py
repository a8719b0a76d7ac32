"""``natsmesh bootstrap``: the wiring's bootstrap, plus the cluster steps.

The key material is made by :mod:`natsmesh_operator.wiring.bootstrap` (no
Kubernetes there); this wrapper adds what needs the API server:

* ``--apply --secret NAME``: the chart's hook. Creates the bootstrap Secret
  (what the operator reads: signing key, system account, server config) and
  the root Secret ``--root-secret`` (default ``NAME-root``, only the root
  seed, which the operator never reads: the admin moves it offline and deletes
  it), or writes the root to ``--root-out FILE`` instead. Only if the
  bootstrap Secret does not exist yet: never replaces it, since rotating the
  root of trust would orphan every account and user.
* ``rotate-signing-key``: a new signing key and an operator JWT (signed with
  the root from ``--root FILE``) that trusts only it, into ``--out DIR`` or
  the bootstrap Secret ``--secret NAME``. A bootstrap made before signing keys
  has its root in the Secret: that root is written to ``--root-out FILE`` and
  removed from the Secret (the migration).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from pathlib import Path

from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Secret

from natsmesh_operator.handlers.kube import decode_secret
from natsmesh_operator.wiring import bootstrap
from natsmesh_operator.wiring.keys import Key, Role

log = logging.getLogger(__name__)

LABELS = {"app.kubernetes.io/managed-by": "natsmesh"}
ROTATE = "rotate-signing-key"


def _option(argv: list[str], name: str, default: str) -> str:
    if name in argv:
        i = argv.index(name)
        if i + 1 < len(argv):
            return argv[i + 1]
    return default


def _client() -> AsyncClient:
    return AsyncClient(config=KubeConfig.from_env(), field_manager="natsmesh-bootstrap")


def _secret(name: str, namespace: str, files: dict[str, str]) -> Secret:
    return Secret(
        metadata=ObjectMeta(name=name, namespace=namespace, labels=LABELS),
        type="Opaque",
        stringData=files,
    )


async def _exists(client: AsyncClient, name: str, namespace: str) -> bool:
    try:
        await client.get(Secret, name, namespace=namespace)
    except ApiError as exc:
        if exc.status.code != 404:
            raise
        return False
    return True


async def apply_secret(
    name: str,
    namespace: str,
    resolver_dir: str,
    operator_name: str,
    *,
    root_secret: str | None = None,
    root_out: Path | None = None,
) -> bool:
    """Create the bootstrap Secret (and the root's home) unless it exists; True if created."""
    client = _client()
    try:
        if await _exists(client, name, namespace):
            return False
        boot = bootstrap.create(operator_name=operator_name, resolver_dir=resolver_dir)
        assert boot.root is not None
        root_file = {bootstrap.ROOT_FILE: boot.root.seed + "\n"}
        # The root first: a bootstrap Secret whose root was lost cannot rotate.
        if root_out is not None:
            bootstrap.write_private(root_out, root_file[bootstrap.ROOT_FILE])
            where = str(root_out)
        else:
            root_name = root_secret or f"{name}-root"
            try:
                await client.create(_secret(root_name, namespace, root_file))
            except ApiError as exc:
                if exc.status.code == 409:
                    raise SystemExit(
                        f"natsmesh bootstrap: Secret {namespace}/{root_name} exists but "
                        f"{namespace}/{name} does not (an earlier bootstrap stopped half-way?): "
                        f"delete {root_name}, unless it is the only copy of a root you "
                        "still use, and run again"
                    ) from exc
                raise
            where = f"Secret {namespace}/{root_name}"
        await client.create(_secret(name, namespace, boot.files()))
        print(
            f"created Secret {namespace}/{name}: operator {boot.operator_public}, "
            f"signing key {boot.signing_key.public}, system account "
            f"{boot.system_account.public}; root seed in {where}: move it offline",
            file=sys.stderr,
        )
        return True
    finally:
        await client.close()


async def rotate_secret(
    name: str, namespace: str, root: Key | None, root_out: Path | None
) -> bootstrap.Bootstrap:
    """Rotate the signing key in the bootstrap Secret (see the module doc)."""
    client = _client()
    try:
        try:
            secret = await client.get(Secret, name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                raise SystemExit(f"natsmesh bootstrap: no Secret {namespace}/{name}") from exc
            raise
        current = bootstrap.Bootstrap.from_files(decode_secret(secret))
        rotated = bootstrap.rotate_signing_key(current, _root_for(current, root, root_out))
        # replace, not patch: stringData merges, and the legacy root must go.
        secret.data = None
        secret.stringData = rotated.files()
        await client.replace(secret)
        return rotated
    finally:
        await client.close()


def _root_for(current: bootstrap.Bootstrap, root: Key | None, root_out: Path | None) -> Key:
    if current.legacy:
        assert current.root is not None
        if root_out is None:
            raise SystemExit(
                "natsmesh bootstrap: this bootstrap still holds the root key; give "
                "--root-out FILE to receive it (it is removed from the bootstrap)"
            )
        bootstrap.write_private(root_out, current.root.seed + "\n")
        print(f"root seed moved to {root_out}: keep it offline", file=sys.stderr)
        return current.root
    if root is None:
        raise SystemExit("natsmesh bootstrap: give --root FILE (the operator root seed)")
    return root


def rotate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"natsmesh bootstrap {ROTATE}",
        description="Replace the operator signing key; the root signs the new operator JWT.",
    )
    parser.add_argument("--root", type=Path, metavar="FILE", help="the operator root seed")
    parser.add_argument(
        "--root-out", type=Path, metavar="FILE", help="legacy bootstrap: where its root goes"
    )
    parser.add_argument("--out", type=Path, help="bootstrap directory to rotate in place")
    parser.add_argument("--secret", metavar="NAME", help="bootstrap Secret to rotate")
    parser.add_argument("--namespace", default="natsmesh", help="namespace of the Secret")
    args = parser.parse_args(argv)
    if bool(args.out) == bool(args.secret):
        parser.error("give exactly one of --out DIR and --secret NAME")
    try:
        root = Key.from_seed(args.root.read_text(), Role.OPERATOR) if args.root else None
    except OSError as exc:
        parser.error(f"cannot read --root: {exc}")
    if args.out:
        current = bootstrap.Bootstrap.load(args.out)
        # A root kept in the directory (local runs) is used and stays there.
        in_dir = current.root is not None and not current.legacy
        if in_dir:
            root = root or current.root
        rotated = bootstrap.rotate_signing_key(current, _root_for(current, root, args.root_out))
        if current.legacy:
            (args.out / bootstrap.ROOT_FILE).unlink()
        (rotated if in_dir else replace(rotated, root=None)).write(args.out)
        where = str(args.out)
    else:
        rotated = asyncio.run(rotate_secret(args.secret, args.namespace, root, args.root_out))
        where = f"Secret {args.namespace}/{args.secret}"
    print(
        f"{where}: signing key now {rotated.signing_key.public}. Next: restart the NATS "
        "servers (they read the operator JWT only at start); the operator re-signs "
        "every account on its next pass",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == [ROTATE]:
        return rotate_main(argv[1:])
    if "--apply" not in argv:
        return bootstrap.main(argv)
    rest = [a for a in argv if a != "--apply"]
    name = _option(rest, "--secret", "")
    if not name:
        print("natsmesh bootstrap: --apply needs --secret NAME", file=sys.stderr)
        return 2
    namespace = _option(rest, "--namespace", "natsmesh")
    root_out = _option(rest, "--root-out", "")
    created = asyncio.run(
        apply_secret(
            name,
            namespace,
            _option(rest, "--resolver-dir", "/data/resolver"),
            _option(rest, "--operator-name", "natsmesh"),
            root_secret=_option(rest, "--root-secret", "") or None,
            root_out=Path(root_out) if root_out else None,
        )
    )
    if not created:
        print(f"Secret {namespace}/{name} exists; keeping the trust root", file=sys.stderr)
    return 0
