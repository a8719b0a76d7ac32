"""The security tier: each test is an attack that must fail next to a legitimate call that works."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.security)
