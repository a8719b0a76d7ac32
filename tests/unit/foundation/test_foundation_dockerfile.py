"""The Dockerfile's properties, read from it (tests/integration/images builds and runs it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO / "Dockerfile"


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
def test_target_has_an_entrypoint_and_the_base_image_from_an_argument(target: str) -> None:
    text = DOCKERFILE.read_text()
    # The runtime base is built here (hack/images.sh: mmdebstrap, python3 only)
    # and passed in; no registry image is named.
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS base$", text, re.MULTILINE)
    assert stages()[target][0].startswith("FROM base AS")
    assert any(i.startswith("ENTRYPOINT") for i in stages()[target])


def test_dependencies_install_from_hashed_locks_only() -> None:
    installs = [i for s in stages().values() for i in s if "pip install" in i]
    assert installs
    for line in installs:
        assert "--require-hashes" in line, line
        assert "--no-index" in line, line


def test_sidecar_image_has_no_operator_dependencies() -> None:
    sidecar_chain = stages()["sidecar-deps"] + stages()["sidecar"]
    joined = "\n".join(sidecar_chain)
    # /wheels/sidecar.txt: requirements/sidecar.txt's pins with the hashes of
    # the wheels built from them (hack/images.sh).
    assert "/wheels/sidecar.txt" in joined
    assert "requirements/$t.txt" in (REPO / "hack" / "images.sh").read_text()
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
