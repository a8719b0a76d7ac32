"""`natsmesh crds`: writes, checks (and fails on stale files), prints, documents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from natsmesh_operator.crdgen import main

REPO = Path(__file__).resolve().parents[3]


def args(crds: Path, docs: Path, *extra: str) -> list[str]:
    return ["--dir", str(crds), "--docs", str(docs), *extra]


@pytest.fixture
def out(tmp_path: Path) -> tuple[Path, Path]:
    crds, docs = tmp_path / "crds", tmp_path / "docs" / "resources.md"
    assert main(args(crds, docs)) == 0
    return crds, docs


def test_checked_in_files_are_fresh() -> None:
    # The same command CI runs, through the `natsmesh` CLI dispatch.
    proc = subprocess.run(
        [sys.executable, "-m", "natsmesh_operator.cli", "crds", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "up to date" in proc.stdout


def test_writes_both_crds_and_the_docs(out: tuple[Path, Path]) -> None:
    crds, docs = out
    assert sorted(p.name for p in crds.iterdir()) == [
        "natsmesh.io_natsroutes.yaml",
        "natsmesh.io_natsservices.yaml",
    ]
    kinds = {yaml.safe_load(p.read_text())["spec"]["names"]["kind"] for p in crds.iterdir()}
    assert kinds == {"NatsService", "NatsRoute"}
    assert docs.read_text().startswith("<!-- Generated")


def test_check_passes_on_fresh_output(out: tuple[Path, Path]) -> None:
    assert main(args(*out, "--check")) == 0


def test_check_fails_on_hand_edited_crd(
    out: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    crds, docs = out
    path = crds / "natsmesh.io_natsroutes.yaml"
    path.write_text(path.read_text().replace("maxItems: 32", "maxItems: 64", 1))
    capsys.readouterr()
    assert main(args(crds, docs, "--check")) == 1
    diff = capsys.readouterr().out
    assert f"--- {path} (on disk)" in diff
    lines = diff.splitlines()
    removed = [line for line in lines if line.startswith("-") and not line.startswith("---")]
    assert len(removed) == 1
    assert removed[0].endswith("maxItems: 64")
    assert any(line.startswith("+") and line.endswith("maxItems: 32") for line in lines)
    # and writing repairs it
    assert main(args(crds, docs)) == 0
    assert main(args(crds, docs, "--check")) == 0


def test_check_fails_on_stale_docs(out: tuple[Path, Path]) -> None:
    crds, docs = out
    docs.write_text(docs.read_text().replace("perTryTimeout", "perTryTimout"))
    assert main(args(crds, docs, "--check")) == 1
    assert main(args(crds, docs, "--check", "--no-docs")) == 0


def test_check_fails_on_missing_and_stray_files(
    out: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    crds, docs = out
    (crds / "natsmesh.io_natsservices.yaml").unlink()
    assert main(args(crds, docs, "--check")) == 1
    main(args(crds, docs))
    (crds / "natsmesh.io_oldthings.yaml").write_text("kind: CustomResourceDefinition\n")
    capsys.readouterr()
    assert main(args(crds, docs, "--check")) == 1
    assert "natsmesh.io_oldthings.yaml: not generated" in capsys.readouterr().out


def test_stdout_prints_applyable_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--stdout"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["metadata"]["name"] for d in docs] == [
        "natsservices.natsmesh.io",
        "natsroutes.natsmesh.io",
    ]


def test_docs_list_every_field_with_type_default_and_rules(out: tuple[Path, Path]) -> None:
    text = out[1].read_text()
    for row in (
        "| `spec.port` | integer |  | ",
        '| `spec.version` | string | `"v1"` | ',
        "| `spec.allowSameNamespace` | boolean | `true` | ",
        '| `spec.rules[].timeout` | duration | `"15s"` | ',
        "| `spec.rules[].destinations[].weight` | integer | `100` | ",
        "| `spec.events.subscriptions[].backoff` | []duration |  | ",
        "| `spec.rules[].match.headers` | map[string]string |  | ",
        "| `status.conditions[].status` | string |  | ",
    ):
        assert row in text, row
    assert "*Rule:* destination weights must sum to 100." in text
    assert "*Rule:* retries.perTryTimeout must be shorter than timeout." in text
    assert "**Required.**" in text
