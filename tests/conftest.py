"""Shared pytest setup: the real-server fixtures live in tests/fixtures/."""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.nats_server",
    "tests.fixtures.nats_operator",
    "tests.fixtures.cluster",
    "tests.fixtures.operator",
    "tests.fixtures.jaeger",
    "tests.fixtures.cpu_budget",
]
