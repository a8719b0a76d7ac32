"""`natsmesh bootstrap --apply` (the chart hook) creates the trust root once, never replaces it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from tests.fixtures.cluster import Cluster

pytestmark = pytest.mark.integration


def run(cluster: Cluster, namespace: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "natsmesh_operator.cli",
            "bootstrap",
            "--apply",
            "--secret",
            "trust",
            "--namespace",
            namespace,
        ],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_apply_creates_once_and_keeps_the_trust_root(cluster: Cluster, namespace: str) -> None:
    first = run(cluster, namespace)
    assert "created Secret" in first.stderr
    secret = cluster.kubectl("get", "secret", "trust", "-n", namespace, "-o", "jsonpath={.data}")
    keys = set(json.loads(secret.stdout))
    assert {"operator.nk", "operator.jwt", "sys.creds", "resolver.conf"} <= keys
    seed = cluster.kubectl(
        "get", "secret", "trust", "-n", namespace, "-o", "jsonpath={.data.operator\\.nk}"
    ).stdout
    conf = base64.b64decode(
        cluster.kubectl(
            "get", "secret", "trust", "-n", namespace, "-o", "jsonpath={.data.resolver\\.conf}"
        ).stdout
    ).decode()
    assert "/data/resolver" in conf
    second = run(cluster, namespace)
    assert "keeping the trust root" in second.stderr
    assert (
        cluster.kubectl(
            "get", "secret", "trust", "-n", namespace, "-o", "jsonpath={.data.operator\\.nk}"
        ).stdout
        == seed
    )
    # The seed never reaches the output.
    assert base64.b64decode(seed).decode().strip() not in first.stderr + first.stdout
