"""Build, load and call decode_attention.cpp: blade::flash_attention for one query per head (a decode step) on CPU.

SDPA spends ~130 µs on a one-query call here whatever the keys; this kernel reads only the keys the bool mask lets
a row see (the filled slots of a KV cache), fp32 or bf16 storage with fp32 math, grouped-query heads read in place.
It takes: query length 1, q/k/v of one dtype (fp32 or bf16) with contiguous last dims, a bool mask or none, not
causal. Built like the other C++ kernels (native_build); None from `library()` where it does not build here.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch

from blade.backends.kernels import native_build

SOURCE = Path(__file__).with_name("decode_attention.cpp")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_P, _N = ctypes.c_void_p, ctypes.c_int64
KERNEL = native_build.AvxKernel(
    SOURCE, "blade_decode_attention",
    [_P, _N, _N] + [_P, _N, _N, _N] * 3 + [_P] + [_N] * 6 + [ctypes.c_float, ctypes.c_int, ctypes.c_int],
    "the decode attention kernel", "one-query attention runs blade's other kernels or SDPA")


def library():
    """The kernel's entry point, built on first use; None where it does not run here."""
    return KERNEL.function()


def unavailable_reason() -> Optional[str]:
    return KERNEL.reason


def supports(q, k, v, mask, causal: bool) -> bool:
    """Whether the kernel takes the call: one query, not causal, fp32/bf16 q, k, v alike on CPU with contiguous last
    dims, a bool mask (any broadcast of [B, Hq, 1, Sk]) or none."""
    if causal or q.dim() != 4 or q.shape[2] != 1 or q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if any(t.device.type != "cpu" or t.stride(-1) != 1 for t in (q, k, v)) or k.shape[2] == 0:
        return False
    if mask is not None and (mask.dtype != torch.bool or mask.device.type != "cpu" or mask.dim() > 4):
        return False
    return library() is not None


def attention(q, k, v, mask=None, scale=None, causal=False) -> torch.Tensor:
    """The op for a call `supports` takes: [B, Hq, 1, Dv], its memory [B, 1, Hq, Dv]."""
    batch, q_heads, _, head_dim = q.shape
    kv_heads, keys, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    out = q.new_empty((batch, 1, q_heads, v_dim))
    mask_strides = (0, 0, 0)
    if mask is not None:
        if mask.dim() < 4:
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        sizes, strides = mask.shape, mask.stride()
        mask_strides = (0 if sizes[0] == 1 else strides[0], 0 if sizes[1] == 1 else strides[1],
                        0 if sizes[3] == 1 else strides[3])
    q_strides, k_strides, v_strides = q.stride(), k.stride(), v.stride()
    code = library()(
        q.data_ptr(), q_strides[0], q_strides[1], k.data_ptr(), k_strides[0], k_strides[1], k_strides[2],
        v.data_ptr(), v_strides[0], v_strides[1], v_strides[2], None if mask is None else mask.data_ptr(),
        *mask_strides, out.data_ptr(), batch, q_heads, kv_heads, keys, head_dim, v_dim, float(scale),
        DTYPES[q.dtype], torch.get_num_threads())
    if code != 0:
        raise ValueError(f"blade's decode attention refused q {tuple(q.shape)} {q.dtype}")
    return out.transpose(1, 2)
