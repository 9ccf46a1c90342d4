"""Compile options, and every environment variable blade reads: each read here only, when it is asked for."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from blade.errors import ConfigError

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
    quantize: str | None = None  # "int8_weight_only" | "int8_dynamic" | "int8_static" | "fp8" | "int4_weight_only"
    calibration: tuple = ()  # flat input lists observed by static quantization
    keep_high_precision: frozenset = frozenset()  # layer (node) names the accuracy guard keeps in fp32
    accuracy_budget: float | None = None  # max relative error vs fp32 the guard holds the model to
    keep_output_dtype: bool = True  # False: floating outputs come back in the compute precision (fp16/bf16)
    # (pass name, site) rewrites the accuracy bisection keeps out of the graph; (pass name, "*") skips that pass
    held_back: frozenset = frozenset()

    @property
    def lowers_precision(self) -> bool:
        return self.quantize is not None or self.precision not in (None, "fp32")


def _flag(name: str) -> bool:
    """An on-by-default switch: anything but "0" leaves it on."""
    return os.environ.get(name, "1") != "0"


def cache_root() -> Path:
    """$BLADE_CACHE_DIR, else $XDG_CACHE_HOME/blade (default ~/.cache/blade): where blade keeps what it measured
    or compiled (peaks, the compile cache, Triton kernels, the native attention kernel)."""
    root = os.environ.get("BLADE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blade"
    return Path(root)


def compile_cache() -> bool:
    """$BLADE_CACHE (default on; "0" turns it off): blade.compile reuses an equal earlier compile from the on-disk
    cache when its `cache` argument is None."""
    return _flag("BLADE_CACHE")


DEFAULT_CACHE_MAX_GB = 20.0


def cache_max_gb() -> float:
    """$BLADE_CACHE_MAX_GB (default 20): the compile cache's size; least recently used entries go beyond it."""
    text = os.environ.get("BLADE_CACHE_MAX_GB", str(DEFAULT_CACHE_MAX_GB))
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1e9:  # also refuses nan and inf
        raise ConfigError(f"BLADE_CACHE_MAX_GB={text!r} is not a size in gigabytes (a number, 0 or more)")
    return value


def autotune() -> bool:
    """$BLADE_AUTOTUNE (default on; "0" turns it off): backend="auto" compiles and times the candidate backends
    when blade.compile's `autotune` argument is None; off, it follows the fixed preference (triton, onnxruntime,
    eager)."""
    return _flag("BLADE_AUTOTUNE")


def debug() -> bool:
    """$BLADE_DEBUG (default off; "1" turns it on): verify the IR after every pass, as compile(debug=True) does."""
    return os.environ.get("BLADE_DEBUG") == "1"


def triton_interpret() -> bool:
    """$TRITON_INTERPRET (Triton's own; "1" on): Triton kernels run on CPU tensors in Triton's interpreter (tests);
    the triton backend is then available on a CPU, one small config per kernel is used, launches are serialized."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_autotune() -> bool:
    """$BLADE_TRITON_AUTOTUNE (default on; "0" turns it off): Triton kernels time their configs on CUDA; off, each
    shape bucket takes its first config untimed (quick tests)."""
    return _flag("BLADE_TRITON_AUTOTUNE")


def native_attention() -> bool:
    """$BLADE_NATIVE_ATTENTION (default on; "0" turns it off): bf16 attention on the CPU runs blade's fused C++
    kernel where it can; off, blade's Python blocked kernel runs instead."""
    return _flag("BLADE_NATIVE_ATTENTION")


def compiler_cache_dirs() -> tuple[str, ...]:
    """$TORCHINDUCTOR_CACHE_DIR and $TRITON_CACHE_DIR where set: where Inductor and Triton write the code they load
    as modules (not the user's code, for the compile cache's key)."""
    return tuple(d for d in (os.environ.get("TORCHINDUCTOR_CACHE_DIR"), os.environ.get("TRITON_CACHE_DIR")) if d)


def cxx() -> str:
    """$CXX (default g++): the C++ compiler that builds the native attention kernel."""
    return os.environ.get("CXX", "g++")
