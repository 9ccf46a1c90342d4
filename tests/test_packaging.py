"""Packaging: the wheel maps passes/, backends/, models/ under blade/ and puts nothing else on top."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"blade": "blade", "passes": "blade/passes", "backends": "blade/backends", "models": "blade/models"}


def test_wheel_holds_every_module_under_blade(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"blade"}
    expected = {f"{MAPPED[src]}/{path.relative_to(ROOT / src).as_posix()}"
                for src in MAPPED for path in (ROOT / src).rglob("*.py") if "__pycache__" not in path.parts}
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"


def test_subpackages_import_from_the_installed_package():
    code = "import blade.passes, blade.backends, blade.models, blade.backends.eager; print(blade.passes.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
