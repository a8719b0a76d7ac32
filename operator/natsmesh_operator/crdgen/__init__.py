"""`natsmesh crds`: write or check `crds/*.yaml` and `docs/resources.md`.

    natsmesh crds                      write the CRDs and the reference page
    natsmesh crds --check              exit 1 with a diff if either is stale
    natsmesh crds --stdout             print the CRDs (for `kubectl apply -f -`)
    natsmesh crds --dir D --docs F     other locations (tests use a tmp dir)

Output is deterministic: the same models always give byte-identical files,
which is what lets CI compare the checked-in copies with a fresh generation.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from natsmesh_operator.api import RESOURCES
from natsmesh_operator.crdgen import docs
from natsmesh_operator.crdgen.crd import crd, file_name, to_yaml

DEFAULT_DIR = Path("crds")
DEFAULT_DOCS = Path("docs/resources.md")


def generate(crd_dir: Path, docs_path: Path | None) -> dict[Path, str]:
    """Every generated file and its content."""
    out = {crd_dir / file_name(r): to_yaml(crd(r)) for r in RESOURCES}
    if docs_path is not None:
        out[docs_path] = docs.render(RESOURCES)
    return out


def stdout_yaml() -> str:
    return "---\n".join(to_yaml(crd(r)) for r in RESOURCES)


def check(files: dict[Path, str], crd_dir: Path) -> list[str]:
    """Differences between ``files`` and the disk, as printable diffs."""
    problems: list[str] = []
    for path, want in files.items():
        have = path.read_text() if path.exists() else ""
        if have != want:
            diff = difflib.unified_diff(
                have.splitlines(keepends=True),
                want.splitlines(keepends=True),
                fromfile=f"{path} (on disk)",
                tofile=f"{path} (from the models)",
            )
            problems.append("".join(diff) or f"{path}: missing\n")
    stray = sorted(set(crd_dir.glob("*.yaml")) - set(files))
    problems += [f"{path}: not generated from any model; remove it\n" for path in stray]
    return problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="natsmesh crds", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="CRD directory")
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="reference page")
    parser.add_argument("--no-docs", action="store_true", help="leave the reference page alone")
    parser.add_argument("--stdout", action="store_true", help="print the CRDs instead")
    args = parser.parse_args(argv)

    if args.stdout:
        sys.stdout.write(stdout_yaml())
        return 0
    files = generate(args.dir, None if args.no_docs else args.docs)
    if args.check:
        problems = check(files, args.dir)
        for problem in problems:
            sys.stdout.write(problem)
        if problems:
            print("natsmesh crds: stale generated files; run `natsmesh crds`", file=sys.stderr)
            return 1
        print(f"natsmesh crds: {len(files)} files up to date")
        return 0
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        print(f"wrote {path}")
    return 0
