"""Compile options shared by the face and the passes (ground floor: imports nothing of blade)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

OPTIMIZE_LEVELS = (0, 1, 2)
DEFAULT_OPTIMIZE = 2


@dataclass
class CompileConfig:
    """What the user asked for; passes read it, never write it."""

    backend: str = "auto"
    optimize: int = DEFAULT_OPTIMIZE
    debug: bool = False  # verify the IR after every pass
    check_accuracy: bool = True


def cache_root() -> Path:
    """Where blade keeps what it measured or compiled: $BLADE_CACHE_DIR, else $XDG_CACHE_HOME/blade."""
    root = os.environ.get("BLADE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blade"
    return Path(root)
