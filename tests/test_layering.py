"""Imports flow one way, floor by floor: a module's floor is its package, and no floor imports one above it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"blade": ROOT / "blade", "passes": ROOT / "passes", "backends": ROOT / "backends", "models": ROOT / "models"}

# The floors, lowest first. Packages on one floor may not import each other (passes and backends).
# The top-level modules other than the face (blade, blade.api) are the basement: errors, config, target.
# serve (the model server) sits on llm; tools (cli, serving, verify) on top: they call the face like a user does.
FLOORS = [("basement",), ("ir",), ("ops",), ("perf",), ("frontend",), ("passes", "backends"), ("runtime",),
          ("driver",), ("face",), ("models",), ("llm",), ("serve",),
          ("tools",)]
FACE = {"__init__", "api"}
MAX_TOP_LEVEL = 10


def package_of(module: str) -> str:
    """The floor package of a dotted blade module name."""
    parts = module.split(".")
    if len(parts) == 1:
        return "face"
    top = parts[1]
    if (SOURCES["blade"] / top).is_dir() or top in ("passes", "backends", "models"):
        return top
    if top == "__main__":
        return "tools"  # python -m blade is the command line
    return "face" if top in FACE else "basement"


def level(package: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if package in floor)


def blade_imports(path: Path) -> set[str]:
    """Every blade.* module a file imports, lazily or not (from blade import x counts as blade.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("blade")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("blade"):
            if node.module == "blade":
                found |= {f"blade.{a.name}" for a in node.names if a.name != "__version__"}
            else:
                found.add(node.module)
    return found


def modules():
    """(dotted name, path) of every module of the package, its mapped folders included."""
    for name, folder in SOURCES.items():
        prefix = "blade" if name == "blade" else f"blade.{name}"
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(folder).with_suffix("").parts
            yield ".".join((prefix, *rel)), path


MODULES = list(modules())


def test_every_package_is_on_a_floor():
    packages = {package_of(name) for name, _ in MODULES}
    unplaced = {p for p in packages if not any(p in floor for floor in FLOORS)}
    assert not unplaced, f"packages on no floor (add them to FLOORS and the README's map): {unplaced}"


def test_top_level_is_small():
    top = sorted(p.stem for p in SOURCES["blade"].glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, f"blade/ has {len(top)} top-level modules: {top}"


@pytest.mark.parametrize("name, path", MODULES, ids=[name for name, _ in MODULES])
def test_no_import_from_a_floor_above_or_beside(name, path):
    own = package_of(name)
    bad = set()
    for imported in blade_imports(path):
        other = package_of(imported)
        if other == own:
            continue
        if level(other) > level(own) or level(other) == level(own):
            bad.add(imported)
    assert not bad, f"{name} (floor {own}) imports from its floor or above: {sorted(bad)}"
