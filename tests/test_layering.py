"""Imports flow one way: the ground floor knows no face; passes and backends know neither each other nor the face."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROUND = {"ir", "shapes", "errors", "config", "target", "serialize", "fx_bridge", "structure", "ops", "cost", "peaks", "fused", "qops"}


def blade_imports(path: Path) -> set[str]:
    """Every blade.* module a file imports (from blade import x counts as blade.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("blade")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("blade"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return found


def files(folder: str):
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in ("passes", "backends", "models"):
        return parts[1]
    return "ground" if parts[1] in GROUND else "face"


@pytest.mark.parametrize("path", [p for p in files("blade") if p.stem in GROUND], ids=lambda p: p.stem)
def test_ground_floor_imports_only_ground_floor(path):
    bad = {m for m in blade_imports(path) if layer_of(m) not in ("ground", "package")}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("folder, forbidden", [("passes", {"face", "backends"}), ("backends", {"face", "passes"})])
def test_passes_and_backends_stay_in_their_lane(folder, forbidden):
    for path in files(folder):
        bad = {m for m in blade_imports(path) if layer_of(m) in forbidden}
        assert not bad, f"{folder}/{path.relative_to(ROOT / folder)} imports {bad}"
