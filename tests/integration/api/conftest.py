"""Fixtures for the API tier (the shared ``crds`` fixture is in tests/fixtures/cluster.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.cluster import Cluster, fresh_namespace


@pytest.fixture(scope="module")
def api_namespace(crds: Cluster) -> Iterator[str]:
    """One namespace for a module's dry runs (nothing is stored in it)."""
    with fresh_namespace(crds, "api") as name:
        yield name
