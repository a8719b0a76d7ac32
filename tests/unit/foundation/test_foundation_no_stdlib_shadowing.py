"""No module of ours can shadow a standard-library module.

``bench/operator.py`` once did: ``python bench/sidecar.py`` puts ``bench/`` first
on ``sys.path``, so the standard library's ``operator`` (imported by
``collections``, ``asyncio``...) resolved to the benchmark, and every run
crashed at import. The rule checked here covers each directory Python or
pytest can put on ``sys.path``:

* the repository root (``python -m ...`` from a clone, pytest's rootdir);
* ``operator/`` and ``sidecar/``, where the packages are installed from;
* the directory of every script (a file with ``if __name__ == "__main__"``)
  under ``bench/``, ``tests/``, ``examples/`` and ``hack/``: Python puts a
  script's directory first;
* every directory of tests that is not a package: pytest's default
  ("prepend") import mode puts it first.

In each, a ``.py`` file or a regular package (a directory with
``__init__.py``) must not be named like a standard-library module. A directory
without ``__init__.py`` (such as ``operator/`` itself, or
``tests/unit/operator/``) is only a namespace-package candidate, which any
real module later on the path wins over, so it cannot shadow anything.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SKIP_PARTS = {".venv", ".git", "__pycache__", ".work", ".mypy_cache", ".ruff_cache"}


def _files(top: Path, pattern: str) -> Iterator[Path]:
    for p in top.rglob(pattern):
        if not SKIP_PARTS.intersection(p.relative_to(REPO).parts):
            yield p


def path_entries() -> set[Path]:
    """Every directory of the repository that can end up on ``sys.path``."""
    dirs = {REPO, REPO / "operator", REPO / "sidecar"}
    for top in ("bench", "tests", "examples", "hack"):
        for py in _files(REPO / top, "*.py"):
            text = py.read_text(errors="replace")
            if '__name__ == "__main__"' in text or "__name__ == '__main__'" in text:
                dirs.add(py.parent)
    for test in _files(REPO / "tests", "test_*.py"):
        if not (test.parent / "__init__.py").exists():
            dirs.add(test.parent)
    return dirs


def top_level_modules(directory: Path) -> dict[str, Path]:
    """What ``import <name>`` would find in ``directory``: modules and regular packages."""
    out: dict[str, Path] = {}
    for child in directory.iterdir():
        if child.suffix == ".py":
            out[child.stem] = child
        elif child.is_dir() and (child / "__init__.py").exists():
            out[child.name] = child
    return out


def shadowing() -> list[str]:
    found = []
    for directory in sorted(path_entries()):
        for name, path in sorted(top_level_modules(directory).items()):
            if name in sys.stdlib_module_names:
                found.append(f"{path.relative_to(REPO)} shadows the standard library's {name!r}")
    return found


def test_no_module_shadows_the_standard_library() -> None:
    assert shadowing() == []


def test_the_check_sees_the_directories_that_matter() -> None:
    entries = path_entries()
    for expected in ("bench", "tests/e2e", "tests/unit/sidecar", "operator", "sidecar"):
        assert REPO / expected in entries, expected
    assert "natsmesh_sidecar" in top_level_modules(REPO / "sidecar")


def test_the_check_catches_a_shadowing_module(tmp_path: Path) -> None:
    (tmp_path / "operator.py").write_text("")
    (tmp_path / "asyncio").mkdir()
    (tmp_path / "asyncio" / "__init__.py").write_text("")
    (tmp_path / "json").mkdir()  # no __init__.py: a namespace candidate only
    names = top_level_modules(tmp_path)
    assert {n for n in names if n in sys.stdlib_module_names} == {"operator", "asyncio"}


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "bench.sidecar", "--help"],
        ["bench/sidecar.py", "--help"],
        ["-m", "bench.operator_scale", "--help"],
    ],
)
def test_benchmarks_start_both_ways(argv: list[str]) -> None:
    """As the README runs them; their imports happen before argparse's --help."""
    proc = subprocess.run(
        [sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
