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
    precision: str | None = None  # "fp32" | "fp16" | "bf16": what matmuls/convs/attention compute in
    quantize: str | None = None  # "int8_weight_only" | "int8_dynamic" | "int8_static" | "fp8"
    calibration: tuple = ()  # flat input lists observed by static quantization
    keep_high_precision: frozenset = frozenset()  # layer (node) names the accuracy guard keeps in fp32
    accuracy_budget: float | None = None  # max relative error vs fp32 the guard holds the model to
    keep_output_dtype: bool = True  # False: floating outputs come back in the compute precision (fp16/bf16)
    # (pass name, site) rewrites the accuracy bisection keeps out of the graph; (pass name, "*") skips that pass
    held_back: frozenset = frozenset()

    @property
    def lowers_precision(self) -> bool:
        return self.quantize is not None or self.precision not in (None, "fp32")


def cache_root() -> Path:
    """Where blade keeps what it measured or compiled: $BLADE_CACHE_DIR, else $XDG_CACHE_HOME/blade."""
    root = os.environ.get("BLADE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blade"
    return Path(root)
