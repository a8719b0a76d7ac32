"""The real API server refuses invalid resources with a message naming the
field and the rule, and accepts every example."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.fixtures.cluster import Cluster
from tests.unit.api.invalid_resources import CASES, ROUTE, SERVICE, Case

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))


def dry_run_create(cluster: Cluster, namespace: str, body: dict[str, object]) -> tuple[int, str]:
    proc = cluster.kubectl(
        "create",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump(body),
        check=False,
    )
    return proc.returncode, proc.stderr


@pytest.mark.integration
@pytest.mark.parametrize("body", [SERVICE, ROUTE], ids=["service", "route"])
def test_table_bases_are_accepted(
    crds: Cluster, api_namespace: str, body: dict[str, object]
) -> None:
    # Otherwise a case could be refused for something other than its change.
    code, err = dry_run_create(crds, api_namespace, body)
    assert code == 0, err


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_invalid_resource_is_refused(crds: Cluster, api_namespace: str, case: Case) -> None:
    code, err = dry_run_create(crds, api_namespace, case.body())
    assert code != 0, f"{case.id} was accepted"
    for fragment in case.expect:
        assert fragment in err, f"{case.id}: {fragment!r} not in:\n{err}"


@pytest.mark.integration
def test_examples_are_accepted(crds: Cluster, api_namespace: str) -> None:
    assert EXAMPLES
    proc = crds.kubectl(
        "apply", "--dry-run=server", "-n", api_namespace, "-f", str(REPO / "examples"), "-R"
    )
    applied = [line for line in proc.stdout.splitlines() if "(server dry run)" in line]
    documents = sum(len(list(yaml.safe_load_all(p.read_text()))) for p in EXAMPLES)
    assert len(applied) == documents, proc.stdout
