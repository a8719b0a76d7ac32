"""``natsmesh bootstrap``: the wiring's bootstrap, plus ``--apply`` into a cluster.

The key material is made by :mod:`natsmesh_operator.wiring.bootstrap` (no
Kubernetes there); this wrapper adds the one Kubernetes step the chart's hook
Job needs: create the Secret if it does not exist yet. It never replaces an
existing one: rotating the root of trust would orphan every account and user.
"""

from __future__ import annotations

import asyncio
import sys

from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Secret

from natsmesh_operator.wiring import bootstrap


def _option(argv: list[str], name: str, default: str) -> str:
    if name in argv:
        i = argv.index(name)
        if i + 1 < len(argv):
            return argv[i + 1]
    return default


async def apply_secret(name: str, namespace: str, resolver_dir: str, operator_name: str) -> bool:
    """Create the bootstrap Secret unless it exists; True if created."""
    kube = AsyncClient(config=KubeConfig.from_env(), field_manager="natsmesh-bootstrap")
    try:
        try:
            await kube.get(Secret, name, namespace=namespace)
            return False
        except ApiError as exc:
            if exc.status.code != 404:
                raise
        boot = bootstrap.create(operator_name=operator_name, resolver_dir=resolver_dir)
        await kube.create(
            Secret(
                metadata=ObjectMeta(
                    name=name,
                    namespace=namespace,
                    labels={"app.kubernetes.io/managed-by": "natsmesh"},
                ),
                type="Opaque",
                stringData=boot.files(),
            )
        )
        print(
            f"created Secret {namespace}/{name}: operator {boot.operator.public}, "
            f"system account {boot.system_account.public}",
            file=sys.stderr,
        )
        return True
    finally:
        await kube.close()


def main(argv: list[str]) -> int:
    if "--apply" not in argv:
        return bootstrap.main(argv)
    rest = [a for a in argv if a != "--apply"]
    name = _option(rest, "--secret", "")
    if not name:
        print("natsmesh bootstrap: --apply needs --secret NAME", file=sys.stderr)
        return 2
    namespace = _option(rest, "--namespace", "natsmesh")
    created = asyncio.run(
        apply_secret(
            name,
            namespace,
            _option(rest, "--resolver-dir", "/data/resolver"),
            _option(rest, "--operator-name", "natsmesh"),
        )
    )
    if not created:
        print(f"Secret {namespace}/{name} exists; keeping the trust root", file=sys.stderr)
    return 0
