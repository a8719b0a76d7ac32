"""Fixtures for the API tier (the shared ``crds`` fixture is in tests/fixtures/cluster.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.fixtures.cluster import Cluster


@pytest.fixture(scope="module")
def api_namespace(crds: Cluster) -> Iterator[str]:
    """One namespace for a module's dry runs (nothing is stored in it)."""
    name = f"api-{uuid.uuid4().hex[:8]}"
    crds.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        crds.kubectl("delete", "namespace", name, "--wait=false", check=False)
