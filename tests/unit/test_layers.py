"""The package's layering, read from the source with ast: every import (top level, inside a
function, or under TYPE_CHECKING) runs down or sideways within a layer, never up, and no two
modules import each other, directly or around a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROXY = Path(__file__).resolve().parents[2] / "proxy"

# bottom to top; a module may import from its own layer or below
LAYERS = {
    "proxy": 0,
    "proxy.config": 0,
    "proxy.tls": 1,
    "proxy.telemetry": 1,
    "proxy.wire": 2,
    "proxy.routes": 3,
    "proxy.oauth": 3,
    "proxy.ops": 4,
    "proxy.commands": 5,
    "proxy.cli": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PROXY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PROXY.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The proxy modules a file imports (a name imported from a package may be a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("proxy")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proxy"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) - {name} for name, path in mods.items()}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    return [
        f"{mod} (layer {layer(mod)}) imports {dep} (layer {layer(dep)})"
        for mod, deps in sorted(g.items())
        for dep in sorted(deps)
        if layer(dep) > layer(mod)
    ]


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                found.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    return found


def test_every_module_is_in_a_layer() -> None:
    for name in modules():
        layer(name)


def test_no_import_runs_upward() -> None:
    assert upward_imports(graph()) == []


def test_no_two_modules_import_each_other() -> None:
    assert cycles(graph()) == []


def test_the_checks_catch_an_upward_import_and_a_circle() -> None:
    g = graph()
    g["proxy.wire.pool"] = g["proxy.wire.pool"] | {"proxy.ops.service"}
    assert upward_imports(g) == ["proxy.wire.pool (layer 2) imports proxy.ops.service (layer 4)"]
    g["proxy.wire.http"] = g["proxy.wire.http"] | {"proxy.wire.pool"}
    assert ["proxy.wire.http", "proxy.wire.pool", "proxy.wire.http"] in [c[-3:] for c in cycles(g)]


def test_every_subpackage_says_what_lives_there_and_what_it_may_import() -> None:
    for init in PROXY.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "Imports:" in doc, init


@pytest.mark.parametrize("mod", sorted(LAYERS))
def test_each_layer_exists(mod: str) -> None:
    assert mod in modules(), mod
