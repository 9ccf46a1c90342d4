"""Build, load and call attention_bf16.cpp, blade's fused bf16 CPU attention kernel (AVX512-BF16), through ctypes.

The source is compiled once per machine with the system's C++ compiler ($CXX, else g++) into blade's cache directory
(config.cache_root()/native, named by a hash of source, flags and compiler), then loaded with ctypes. Its OpenMP is
the libgomp torch already loaded (same soname, where torch ships GNU OpenMP as its pip wheels do), and each call asks
for torch.get_num_threads() threads. Where the CPU lacks AVX512-BF16 or has AMX (where PyTorch's oneDNN kernels use
the tiles; this kernel is unmeasured there), no compiler is found or the build fails (warned once), `library()` is
None, the reason in `unavailable_reason()`, and blade's Python blocked kernel runs instead. $BLADE_NATIVE_ATTENTION=0
turns it off. As in SDPA, a NaN or inf in a value row behind the mask or the causal triangle still reaches the
output (its probability is 0, and 0 · NaN is NaN).
"""
from __future__ import annotations

import ctypes
import functools
import warnings
from pathlib import Path
from typing import Optional

import torch

from blade import config
from blade.backends.kernels import native_build
from blade.ir.shapes import is_static
from blade.target import detect

SOURCE = Path(__file__).with_name("attention_bf16.cpp")
FLAGS = [*native_build.AVX512_FLAGS, "-mavx512bf16"]
_reason: Optional[str] = None


def enabled() -> bool:
    """config.native_attention() ($BLADE_NATIVE_ATTENTION)."""
    return config.native_attention()


def available() -> bool:
    """Whether the native kernel is on and runs on this machine (builds it on first use)."""
    return enabled() and library() is not None


def unavailable_reason() -> Optional[str]:
    """Why the kernel does not run here (None when it does, or `library()` was not tried yet)."""
    return "BLADE_NATIVE_ATTENTION=0" if not enabled() else _reason


@functools.lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, built on first use; None where it does not run here (the reason in
    `unavailable_reason()`; a failed build is warned once, with what to do)."""
    global _reason
    _reason = None
    features = detect("cpu").features
    if "avx512_bf16" not in features:
        _reason = "this CPU has no AVX512-BF16"
        return None
    if "amx_bf16" in features:  # PyTorch's oneDNN kernels use the AMX tiles there; this kernel is unmeasured on them
        _reason = "this CPU has AMX, where PyTorch's own bf16 kernels are used (this kernel is unmeasured there)"
        return None
    try:
        lib = native_build.load(SOURCE, FLAGS)
    except Exception as err:  # noqa: BLE001 - any failure to build or load means: run the Python kernel
        _reason = str(err)
        warnings.warn(f"blade: the fused bf16 CPU attention kernel is unavailable ({_reason}); blade::flash_attention "
                      "runs its slower Python blocked kernel instead. It needs a C++ compiler with AVX512-BF16 support "
                      "(g++ 10 or later, or $CXX).", RuntimeWarning, stacklevel=3)
        return None
    fn = lib.blade_attention_bf16
    fn.restype = ctypes.c_int
    fn.argtypes = (([ctypes.c_void_p] + [ctypes.c_int64] * 3) * 3 + [ctypes.c_void_p, ctypes.c_int]
                   + [ctypes.c_int64] * 3 + [ctypes.c_void_p] + [ctypes.c_int64] * 7
                   + [ctypes.c_float, ctypes.c_int, ctypes.c_int])
    return lib


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    """Whether the native kernel takes these: bf16 CPU q/k/v with contiguous rows, an even head dim, a value dim,
    keys, and a bool or floating mask (or none); and whether it is on and loaded here."""
    if any(t.dim() != 4 for t in (q, k, v)) or q.dtype != k.dtype or q.dtype != v.dtype or k.shape[2] == 0:
        return False
    if any(t.device.type != "cpu" for t in (q, k, v) + (() if mask is None else (mask,))):
        return False
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if mask is not None and not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        return False
    return takes_shapes(q.dtype, q.shape[-1], v.shape[-1], q.shape[1], k.shape[1])


def takes_shapes(dtype: torch.dtype, head_dim, v_dim, q_heads, kv_heads) -> bool:
    """What the kernel needs of the dtype and head sizes (bf16, an even head dim, a value dim, query
    heads a multiple of key heads; symbolic sizes are not taken), and that it is on and loaded here."""
    sizes = (head_dim, v_dim, q_heads, kv_heads)
    if dtype != torch.bfloat16 or not all(is_static(n) for n in sizes) or not enabled():
        return False
    if head_dim < 2 or head_dim % 2 or v_dim < 1 or kv_heads < 1 or q_heads % kv_heads:
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
    strides = [0, 0, 0] if mask is None else [st if n > 1 else 0 for n, st in zip(mask.shape[:3], mask.stride()[:3])]
    status = library().blade_attention_bf16(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
        None if mask is None else mask.data_ptr(), MASK_KINDS[kind], *strides,
        out.data_ptr(), batch, q_heads, kv_heads, q_len, k_len, head_dim, v_dim, float(scale), int(causal),
        torch.get_num_threads())
    if status == 2:
        raise MemoryError(f"blade's native attention could not allocate its buffers for k {tuple(k.shape)}")
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
