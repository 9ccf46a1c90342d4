"""Build a C++ kernel source once per machine into blade's cache (named by a hash of source, flags and compiler) and
load it with ctypes; a cached file that does not load is built again once."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from blade import config

AVX512_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-strict-aliasing",
                "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]


def load(source: Path, flags: list[str]) -> ctypes.CDLL:
    """The library built from `source` with `flags`, from the cache when it is there."""
    path = built(source, flags)
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return ctypes.CDLL(str(built(source, flags)))


def built(source: Path, flags: list[str]) -> Path:
    """The shared library for this source, flags and compiler, compiled into the cache when not there yet."""
    compiler = shutil.which(config.cxx())
    if compiler is None:
        raise OSError(f"no C++ compiler: {config.cxx()!r} is not on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, timeout=60).stdout
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + version).hexdigest()[:20]
    target = config.cache_root() / "native" / f"{source.stem}_{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        out = Path(work) / target.name
        result = subprocess.run([compiler, *flags, "-o", str(out), str(source)], capture_output=True, timeout=300)
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            raise OSError(f"{compiler} failed to build {source.name}: {stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders (test workers) each leave a whole file
    return target


class AvxKernel:
    """One C++ entry point built for AVX-512 on first use: `function()` is it (argtypes set, returns int), or None
    where the CPU lacks AVX-512 or the build fails (warned once, saying what runs instead); `reason` says why."""

    def __init__(self, source: Path, symbol: str, argtypes: list, what: str, instead: str):
        self.source, self.symbol, self.argtypes, self.what, self.instead = source, symbol, argtypes, what, instead
        self.reason: str | None = None
        self._function = None
        self._tried = False
        self._lock = threading.Lock()

    def function(self):
        if not self._tried:
            with self._lock:  # one build; concurrent first callers wait for it rather than see None
                if not self._tried:
                    self._function = self._build()
                    self._tried = True
        return self._function

    def _build(self):
        from blade.target import detect

        if "avx512f" not in detect("cpu").features:
            self.reason = "this CPU has no AVX-512"
            return None
        try:
            lib = load(self.source, AVX512_FLAGS)
        except Exception as err:  # noqa: BLE001 - any failure to build or load means: run what comes next
            self.reason = str(err)
            import warnings

            warnings.warn(f"blade: {self.what} is unavailable ({self.reason}); {self.instead}. It needs a C++ compiler "
                          "with AVX-512 support (g++ 8 or later, or $CXX).", RuntimeWarning, stacklevel=4)
            return None
        fn = getattr(lib, self.symbol)
        fn.restype = ctypes.c_int
        fn.argtypes = self.argtypes
        return fn
