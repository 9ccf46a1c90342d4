"""Build, load and call attention_bf16.cpp, blade's fused bf16 CPU attention kernel (AVX512-BF16), through ctypes.

The source is compiled once per machine with the system's C++ compiler ($CXX, else g++) into blade's cache directory
(config.cache_root()/native, named by a hash of source, flags and compiler), then loaded with ctypes. Its OpenMP is
the libgomp torch already loaded (same soname), so it shares torch's threads and torch.set_num_threads. Where the CPU
lacks AVX512-BF16, no compiler is found or the build fails, `library()` is None (the reason in `unavailable_reason()`,
warned once) and blade's Python blocked kernel runs instead. $BLADE_NATIVE_ATTENTION=0 turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from blade.config import cache_root
from blade.target import detect

SOURCE = Path(__file__).with_name("attention_bf16.cpp")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
         "-mavx512bf16", "-mfma"]
_reason: Optional[str] = None


def enabled() -> bool:
    """$BLADE_NATIVE_ATTENTION ('0' turns the native kernel off); on by default."""
    return os.environ.get("BLADE_NATIVE_ATTENTION", "1") != "0"


def available() -> bool:
    """Whether the native kernel is on and runs on this machine (builds it on first use)."""
    return enabled() and library() is not None


def unavailable_reason() -> Optional[str]:
    """Why `library()` is None (None when it loaded or was not tried yet)."""
    return _reason


@functools.lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, built on first use; None where it cannot run here (warned once, with the reason)."""
    global _reason
    _reason = None
    try:
        if "avx512_bf16" not in detect("cpu").features:
            raise OSError("this CPU has no AVX512-BF16")
        lib = ctypes.CDLL(str(_built()))
    except (OSError, subprocess.SubprocessError) as err:
        _reason = str(err)
        warnings.warn(f"blade: the fused bf16 CPU attention kernel is unavailable ({_reason}); blade::flash_attention "
                      "runs its Python blocked kernel instead (slower). Install a C++ compiler (g++) to enable it.",
                      RuntimeWarning, stacklevel=2)
        return None
    fn = lib.blade_attention_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = (([ctypes.c_void_p] + [ctypes.c_int64] * 3) * 3 + [ctypes.c_void_p, ctypes.c_int]
                   + [ctypes.c_int64] * 3 + [ctypes.c_void_p] + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int])
    return lib


def _built() -> Path:
    """The shared library for this source, flags and compiler, compiled into the cache when not there yet."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise OSError(f"no C++ compiler: {os.environ.get('CXX', 'g++')!r} is not on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), version]).encode()).hexdigest()[:20]
    target = cache_root() / "native" / f"attention_bf16_{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        built = Path(work) / target.name
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed to build {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: concurrent builders (test workers) each leave a whole file
    return target


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    """Whether the native kernel takes these: bf16 CPU q/k/v with contiguous rows, an even head dim, a value dim that
    is a multiple of 16, keys, and a bool or floating mask (or none); and whether it is on and loaded here."""
    if not (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16 and enabled()):
        return False
    if q.shape[-1] % 2 or v.shape[-1] % 16 or k.shape[2] == 0 or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return False
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if mask is not None and not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        return False
    return library() is not None


MASK_KINDS = {None: 0, "additive": 1, "bool": 2}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    """The op on inputs `supports` takes, in its output layout ([B, Hq, Sq, Dv] view of [B, Sq, Hq, Dv] memory)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    out = q.new_empty((batch, q_len, q_heads, v_dim))
    if out.numel() == 0:
        return out.transpose(1, 2)
    kind, mask = (None, None) if mask is None else _kernel_mask(mask, k_len)
    strides = [0, 0, 0] if mask is None else [st if size > 1 else 0 for size, st in zip(mask.shape[:3], mask.stride()[:3])]
    status = library().blade_attention_bf16(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
        None if mask is None else mask.data_ptr(), MASK_KINDS[kind], *strides,
        out.data_ptr(), batch, q_heads, kv_heads, q_len, k_len, head_dim, v_dim, float(scale), int(causal))
    if status != 0:
        raise ValueError(f"blade's native attention refused q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(supports() should have said so)")
    return out.transpose(1, 2)


def _kernel_mask(mask: torch.Tensor, k_len: int) -> tuple[str, torch.Tensor]:
    """The mask as the kernel reads it: 4-D, keys contiguous and k_len of them, fp32 (additive) or bool; the other
    dims keep their broadcast (size 1)."""
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if mask.shape[-1] != k_len:
        mask = mask.expand(*mask.shape[:3], k_len)
    kind = "bool" if mask.dtype == torch.bool else "additive"
    if kind == "additive":
        mask = mask.float()
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    return kind, mask
