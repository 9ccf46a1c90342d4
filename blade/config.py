"""Compile options shared by the face and the passes (ground floor: imports nothing of blade)."""
from __future__ import annotations

from dataclasses import dataclass

OPTIMIZE_LEVELS = (0, 1, 2)
DEFAULT_OPTIMIZE = 2


@dataclass
class CompileConfig:
    """What the user asked for; passes read it, never write it."""

    backend: str = "auto"
    optimize: int = DEFAULT_OPTIMIZE
    debug: bool = False  # verify the IR after every pass
    check_accuracy: bool = True
