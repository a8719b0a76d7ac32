"""The Dockerfile cannot be built here (no Docker engine): its properties are read from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[3] / "Dockerfile"


def stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    result: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            current = result.setdefault(m.group(1), [])
        if current is not None:
            current.append(line)
    return result


@pytest.mark.parametrize("target", ["operator", "sidecar"])
def test_target_runs_as_numeric_non_root_user(target: str) -> None:
    users = [i.split()[1] for i in stages()[target] if i.startswith("USER ")]
    assert users, f"{target} has no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit()
    assert int(uid) != 0
    assert gid == "" or (gid.isdigit() and int(gid) != 0)


@pytest.mark.parametrize("target", ["operator", "sidecar"])
def test_target_has_an_entrypoint_and_slim_base(target: str) -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", text)
    assert any(i.startswith("ENTRYPOINT") for i in stages()[target])


def test_dependencies_install_from_hashed_locks_only() -> None:
    installs = [i for s in stages().values() for i in s if "pip install" in i]
    assert installs
    for line in installs:
        assert "--require-hashes" in line, line


def test_sidecar_image_has_no_operator_dependencies() -> None:
    sidecar_chain = stages()["sidecar-deps"] + stages()["sidecar"]
    joined = "\n".join(sidecar_chain)
    assert "requirements/sidecar.txt" in joined
    assert "natsmesh_operator" not in joined
    assert "operator.txt" not in joined
    lock = (DOCKERFILE.parent / "requirements" / "sidecar.txt").read_text()
    for forbidden in ("kopf", "lightkube", "kubernetes"):
        assert not re.search(rf"^{forbidden}==", lock, re.MULTILINE), forbidden


def test_multi_stage_copies_only_the_venv_and_sources() -> None:
    for target in ("operator", "sidecar"):
        copies = [i for i in stages()[target] if i.startswith("COPY")]
        assert any("--from=" in c and "/venv" in c for c in copies)
        assert not any(c.split()[1] == "." for c in copies), "no whole-context copy"
