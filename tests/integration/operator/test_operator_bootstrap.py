"""`natsmesh bootstrap --apply` (the chart hook) creates the trust root once, never
replaces it, and keeps the root key out of the Secret the operator reads;
`rotate-signing-key --secret` replaces the signing key (and migrates a
bootstrap made before signing keys) on the real API server."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from natsmesh_operator.wiring import bootstrap, jwt
from natsmesh_operator.wiring.keys import Key, Role
from tests.fixtures.cluster import Cluster

pytestmark = pytest.mark.integration


def natsmesh(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "natsmesh_operator.cli", "bootstrap", *args],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def run(cluster: Cluster, namespace: str) -> subprocess.CompletedProcess[str]:
    return natsmesh(cluster, "--apply", "--secret", "trust", "--namespace", namespace)


def secret_data(cluster: Cluster, name: str, namespace: str) -> dict[str, str]:
    out = cluster.kubectl("get", "secret", name, "-n", namespace, "-o", "jsonpath={.data}")
    return {k: base64.b64decode(v).decode() for k, v in json.loads(out.stdout).items()}


def test_apply_creates_once_and_keeps_the_trust_root(cluster: Cluster, namespace: str) -> None:
    first = run(cluster, namespace)
    assert "created Secret" in first.stderr
    trust = secret_data(cluster, "trust", namespace)
    assert set(trust) == set(bootstrap.FILES.values())
    assert "/data/resolver" in trust["resolver.conf"]
    # The root is in a Secret of its own, which the operator never reads.
    root_data = secret_data(cluster, "trust-root", namespace)
    assert set(root_data) == {"operator.nk"}
    root = Key.from_seed(root_data["operator.nk"], Role.OPERATOR)
    boot = bootstrap.Bootstrap.from_files(trust)
    assert boot.operator_public == root.public
    assert boot.root is None
    assert root.seed not in json.dumps(trust)
    assert jwt.decode(boot.operator_jwt).nats["signing_keys"] == [boot.signing_key.public]

    second = run(cluster, namespace)
    assert "keeping the trust root" in second.stderr
    assert secret_data(cluster, "trust", namespace) == trust
    # No seed reaches the output.
    for seed in (root.seed, boot.signing_key.seed):
        assert seed not in first.stderr + first.stdout + second.stderr


def test_rotate_signing_key_in_the_secret(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    run(cluster, namespace)
    before = bootstrap.Bootstrap.from_files(secret_data(cluster, "trust", namespace))
    root_file = tmp_path / "root.nk"
    root_file.write_text(secret_data(cluster, "trust-root", namespace)["operator.nk"])
    rotate = ["rotate-signing-key", "--secret", "trust", "--namespace", namespace]

    wrong = tmp_path / "wrong.nk"
    wrong.write_text(Key.create(Role.OPERATOR).seed)
    refused = natsmesh(cluster, *rotate, "--root", str(wrong), check=False)
    assert refused.returncode != 0
    assert "wrong --root" in refused.stderr
    assert bootstrap.Bootstrap.from_files(secret_data(cluster, "trust", namespace)) == before

    done = natsmesh(cluster, *rotate, "--root", str(root_file))
    assert "restart the NATS servers" in done.stderr
    after = bootstrap.Bootstrap.from_files(secret_data(cluster, "trust", namespace))
    assert after.signing_key != before.signing_key
    assert after.system_account == before.system_account
    op = jwt.decode(after.operator_jwt)
    assert op.subject == before.operator_public
    assert op.nats["signing_keys"] == [after.signing_key.public]


def test_rotate_migrates_a_legacy_secret(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    """A bootstrap Secret from before signing keys: the operator.nk is the signer."""
    made = bootstrap.create()
    assert made.root is not None
    files = {k: v for k, v in made.files().items() if k != "signing.nk"}
    files["operator.nk"] = made.root.seed
    op = jwt.decode(made.operator_jwt)
    files["operator.jwt"] = jwt.encode(
        {**op.claims, "nats": {k: v for k, v in op.nats.items() if k != "signing_keys"}},
        made.root,
    )
    cluster.kubectl("apply", "-f", "-", input=bootstrap.secret_manifest(files, "trust", namespace))
    assert bootstrap.Bootstrap.from_files(secret_data(cluster, "trust", namespace)).legacy

    rotate = ["rotate-signing-key", "--secret", "trust", "--namespace", namespace]
    refused = natsmesh(cluster, *rotate, check=False)
    assert refused.returncode != 0
    assert "--root-out" in refused.stderr
    moved = tmp_path / "offline" / "root.nk"
    natsmesh(cluster, *rotate, "--root-out", str(moved))
    assert Key.from_seed(moved.read_text(), Role.OPERATOR) == made.root
    trust = secret_data(cluster, "trust", namespace)
    assert "operator.nk" not in trust
    assert made.root.seed not in json.dumps(trust)
    boot = bootstrap.Bootstrap.from_files(trust)
    assert not boot.legacy
    assert boot.operator_public == made.root.public
