"""Run `helm template` / `helm lint` on charts/natsmesh and parse the output.

helm-unittest is not used: `helm plugin install` fetches it from GitHub, which
these machines cannot reach; pytest over the rendered YAML needs nothing beyond
helm and the venv (see docs/chart.md).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.fixtures.cluster import REPO as REPO  # re-exported for the chart tests
from tests.fixtures.cluster import tool

CHART = REPO / "charts" / "natsmesh"
RELEASE = "nm"
NAMESPACE = "mesh"
FULLNAME = "nm-natsmesh"

Doc = dict[str, Any]

# libyaml's loader is ten times faster on the CRDs; fall back to pure Python.
Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def helm() -> str:
    return tool("helm")


def _values_file(values: Mapping[str, Any], directory: str) -> str:
    path = Path(directory) / "values.yaml"
    path.write_text(yaml.safe_dump(dict(values)))
    return str(path)


@functools.cache
def _run(
    command: str, values_json: str, extra: tuple[str, ...]
) -> subprocess.CompletedProcess[str]:
    values = json.loads(values_json)
    with tempfile.TemporaryDirectory() as tmp:
        args = [helm(), command]
        if command == "template":
            args += [RELEASE]
        args += [str(CHART), "--namespace", NAMESPACE, "-f", _values_file(values, tmp), *extra]
        return subprocess.run(args, capture_output=True, text=True, timeout=60)


def run(
    command: str, values: Mapping[str, Any] | None = None, *extra: str
) -> subprocess.CompletedProcess[str]:
    """One cached helm run; the values are given as a nested mapping."""
    return _run(command, json.dumps(values or {}, sort_keys=True), tuple(extra))


@dataclass(frozen=True)
class Manifest:
    docs: tuple[Doc, ...]

    def kinds(self) -> list[str]:
        return [d["kind"] for d in self.docs]

    def all(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str | None = None) -> Doc:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def has(self, kind: str) -> bool:
        return any(d["kind"] == kind for d in self.docs)

    def pod_specs(self) -> Iterable[tuple[Doc, Doc]]:
        """(owner, pod spec) for every workload."""
        for d in self.docs:
            if d["kind"] in {"Deployment", "StatefulSet", "Job", "DaemonSet"}:
                yield d, d["spec"]["template"]["spec"]


def render(values: Mapping[str, Any] | None = None) -> Manifest:
    """The rendered manifest (with hooks); fails with helm's message on error.

    Cached per values: tests must not mutate the returned documents.
    """
    return _render(json.dumps(values or {}, sort_keys=True))


@functools.cache
def _render(values_json: str) -> Manifest:
    proc = _run("template", values_json, ())
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return Manifest(tuple(d for d in yaml.load_all(proc.stdout, Loader=Loader) if d))


def render_error(values: Mapping[str, Any]) -> str:
    """helm template's error message for values that must be refused."""
    proc = run("template", values)
    assert proc.returncode != 0, f"helm template accepted {values}"
    return proc.stderr


def env(container: Doc) -> dict[str, Any]:
    """Container env as name -> value (or the valueFrom mapping)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def operator_container(manifest: Manifest) -> Doc:
    deployment = manifest.get("Deployment", f"{FULLNAME}-operator")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "operator")


def render_notes(values: Mapping[str, Any] | None = None) -> str:
    """NOTES.txt as `helm install` prints it.

    `helm template` never renders NOTES.txt and `helm install --dry-run` needs a
    cluster, so a copy of the chart renders it through `tpl` in a YAML template.
    """
    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / "natsmesh"
        shutil.copytree(CHART, chart)
        (chart / "templates" / "NOTES.txt").rename(chart / "files" / "notes.txt")
        (chart / "templates" / "notes.yaml").write_text(
            'notes: {{ tpl (.Files.Get "files/notes.txt") . | toJson }}\n'
        )
        proc = subprocess.run(
            [
                helm(),
                "template",
                RELEASE,
                str(chart),
                "--namespace",
                NAMESPACE,
                "-f",
                _values_file(values or {}, tmp),
                "--show-only",
                "templates/notes.yaml",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    notes: str = yaml.safe_load(proc.stdout)["notes"]
    return notes
