"""Fixtures for the API tier: the CRDs installed on the real control plane."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.cluster import Cluster

REPO = Path(__file__).resolve().parents[3]
CRD_NAMES = ("natsservices.natsmesh.io", "natsroutes.natsmesh.io")


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Cluster:
    """The checked-in CRDs applied, established and visible in discovery."""
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=natsmesh-tests",
        "-f",
        str(REPO / "crds"),
    )
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=30s", *(f"crd/{n}" for n in CRD_NAMES)
    )
    # Established comes a moment before discovery (and so kubectl) knows the
    # new kinds and the category.
    deadline = time.monotonic() + 30
    while True:
        proc = cluster.kubectl("get", "natsmesh", "-A", check=False)
        if proc.returncode == 0:
            return cluster
        if time.monotonic() > deadline:
            raise AssertionError(f"kubectl get natsmesh kept failing:\n{proc.stderr}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def api_namespace(crds: Cluster) -> Iterator[str]:
    """One namespace for a module's dry runs (nothing is stored in it)."""
    name = f"api-{uuid.uuid4().hex[:8]}"
    crds.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        crds.kubectl("delete", "namespace", name, "--wait=false", check=False)
