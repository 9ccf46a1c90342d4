"""Build a C++ kernel source once per machine into blade's cache (named by a hash of source, flags and compiler) and
load it with ctypes; a cached file that does not load is built again once."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
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
