"""Every environment variable blade reads is read in blade/config.py, at call time."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from blade import config
from blade.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("blade", "passes", "backends", "models")
CONFIG = ROOT / "blade" / "config.py"


def environment_reads(path: Path) -> list[int]:
    """Lines of `path` that touch os.environ or os.getenv, or import environ/getenv from os."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "getenvb", "environb") \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" \
                and any(a.name in ("environ", "getenv", "getenvb", "environb") for a in node.names):
            lines.append(node.lineno)
    return lines


def test_no_module_reads_the_environment_outside_config():
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != CONFIG and environment_reads(path):
                found[str(path.relative_to(ROOT))] = environment_reads(path)
    assert not found, f"read the environment outside blade/config.py (add a function there): {found}"
    assert environment_reads(CONFIG), "the scan must see config's own reads"


def test_knobs_are_read_when_asked(monkeypatch):
    monkeypatch.setenv("BLADE_AUTOTUNE", "0")
    assert not config.autotune()
    monkeypatch.setenv("BLADE_AUTOTUNE", "1")
    assert config.autotune()
    monkeypatch.delenv("BLADE_CACHE_MAX_GB", raising=False)
    assert config.cache_max_gb() == config.DEFAULT_CACHE_MAX_GB
    monkeypatch.setenv("BLADE_CACHE_MAX_GB", "inf")
    with pytest.raises(ConfigError, match="BLADE_CACHE_MAX_GB='inf'"):
        config.cache_max_gb()
    monkeypatch.setenv("BLADE_CACHE_DIR", "/somewhere/else")
    assert config.cache_root() == Path("/somewhere/else")
    monkeypatch.delenv("BLADE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert config.cache_root() == Path("/xdg/blade")
