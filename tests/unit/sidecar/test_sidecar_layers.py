"""The sidecar's layers hold: no import cycles, and no layer imports one above it.

Every import counts, the ones inside functions (kept lazy for memory) and
under ``TYPE_CHECKING`` too: a type named from a higher layer is a
dependency on it all the same. The map is docs/architecture.md's
"Sidecar layers" table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import natsmesh_sidecar

pytestmark = pytest.mark.unit

PACKAGE = Path(natsmesh_sidecar.__file__).parent
ROOT = "natsmesh_sidecar"
#: Modules at the package root that wire the rest together; every other
#: root module is the contract (shared with the operator) and imports only
#: its peers.
WIRING = {"natsmesh_sidecar.app", "natsmesh_sidecar.__main__"}
CONTRACT = "contract"
#: Layer -> the layers it may import (itself included).
MAY_IMPORT: dict[str, set[str]] = {
    CONTRACT: {CONTRACT},
    "observe": {CONTRACT, "observe"},
    "policy": {CONTRACT, "policy"},
    "transport": {CONTRACT, "transport"},
    "edge": {CONTRACT, "observe", "transport", "edge"},
    "calls": {CONTRACT, "observe", "policy", "transport", "edge", "calls"},
    "events": {CONTRACT, "observe", "policy", "transport", "edge", "events"},
}
LAYERS = set(MAY_IMPORT) | {"wiring"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str:
    """The folder under the package root, ``wiring`` or ``contract`` for root modules."""
    if module in WIRING:
        return "wiring"
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()):
        return parts[1]
    return CONTRACT


def imports_of(module: str) -> set[str]:
    """The package's modules ``module`` imports, wherever the import statement is."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import mod`` imports the module pkg.mod.
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]  # ``import a.b.c`` of a package's module
            if name.startswith(ROOT) and name != module:
                found.add(name)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_is_in_a_known_layer() -> None:
    assert {layer_of(m) for m in MODULES} <= LAYERS
    # The map covers the folders that exist: a new folder needs its row.
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == LAYERS - {CONTRACT, "wiring"}


def test_no_layer_imports_one_above_it() -> None:
    wrong = sorted(
        f"{module} ({layer_of(module)}) imports {dep} ({layer_of(dep)})"
        for module, deps in GRAPH.items()
        if layer_of(module) != "wiring"
        for dep in deps
        if layer_of(dep) not in MAY_IMPORT[layer_of(module)]
    )
    assert wrong == []


def test_nothing_imports_the_wiring() -> None:
    wrong = sorted(
        f"{module} imports {dep}"
        for module, deps in GRAPH.items()
        if module not in WIRING
        for dep in deps
        if dep in WIRING
    )
    assert wrong == []


def test_no_import_cycles() -> None:
    """Package ``__init__`` edges aside: importing ``a.b.c`` runs ``a.b``'s
    ``__init__`` first, which is not a dependency of ``a.b.c`` on ``a.b``."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for dep in sorted(GRAPH[module]):
            cycle = visit(dep)
            if cycle is not None:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in MODULES:
        assert visit(module) is None


def test_the_checks_see_what_they_check() -> None:
    """The parser finds lazy and TYPE_CHECKING imports and ``from pkg import mod``."""
    assert "natsmesh_sidecar.transport.stream.caller" in GRAPH["natsmesh_sidecar.edge.listener"]
    assert "natsmesh_sidecar.observe.tracing" in GRAPH["natsmesh_sidecar.app"]
    assert (
        "natsmesh_sidecar.transport.stream.protocol"
        in GRAPH["natsmesh_sidecar.transport.stream.caller"]
    )
    assert layer_of("natsmesh_sidecar.codec") == CONTRACT
    assert layer_of("natsmesh_sidecar.transport.stream.caller") == "transport"
    assert layer_of("natsmesh_sidecar.app") == "wiring"
