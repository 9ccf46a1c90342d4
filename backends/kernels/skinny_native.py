"""Build, load and call skinny_linear.cpp, blade's CPU kernel for linear layers over 1..8 rows (a decode step).

torch's GEMM reads a weight at 13-18 GB/s for one row here and slower for eight (bench/results/llm_cpu.md); this
kernel streams each weight row once for all rows of x, at the memory's speed. It takes fp32 or bf16 x (bf16 is
widened to fp32 first), a contiguous [out, in] weight in fp32, bf16 or int8 with a scale per row, an optional bias;
sums are fp32, the result in x's dtype. Built like attention_native (native_build, once per machine); where the CPU
lacks AVX-512 or the build fails (warned once) `library()` is None and the callers run PyTorch.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch

from blade.backends.kernels import native_build

SOURCE = Path(__file__).with_name("skinny_linear.cpp")
MAX_ROWS = 8
WEIGHT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
_P, _N = ctypes.c_void_p, ctypes.c_int64
KERNEL = native_build.AvxKernel(
    SOURCE, "blade_skinny_linear", [_P, _N, _N, _P, ctypes.c_int, _P, _P, _P, _N, _N, _N, ctypes.c_int],
    "the skinny CPU linear kernel", "linear layers run PyTorch's GEMM")


def library():
    """The kernel's entry point, built on first use; None where it does not run here."""
    return KERNEL.function()


def unavailable_reason() -> Optional[str]:
    return KERNEL.reason


def rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


def supports(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
             scale: Optional[torch.Tensor] = None) -> bool:
    """Whether the kernel takes this call (and runs here): CPU, 1..8 rows of fp32/bf16 x, a contiguous 2-D weight of
    a kind it reads whose width matches, an fp32-castable 1-D bias and scale of the right length."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or weight.device.type != "cpu":
        return False
    if weight.dim() != 2 or weight.dtype not in WEIGHT_KINDS or not weight.is_contiguous():
        return False
    if x.dim() == 0 or x.shape[-1] != weight.shape[1] or not 1 <= rows(x) <= MAX_ROWS:
        return False
    if (weight.dtype == torch.int8) != (scale is not None):
        return False
    for vector in (bias, scale):
        if vector is not None and (vector.shape != (weight.shape[0],) or not vector.dtype.is_floating_point):
            return False
    return library() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ (weight · scale)ᵀ + bias for a call `supports` takes; y in x's dtype."""
    n, k = weight.shape
    flat = x.reshape(-1, k).float().contiguous()
    out = torch.empty(flat.shape[0], n, dtype=torch.float32)
    vectors = [v.float().contiguous() if v is not None else None for v in (scale, bias)]
    code = library()(
        flat.data_ptr(), flat.shape[0], k, weight.data_ptr(), WEIGHT_KINDS[weight.dtype],
        vectors[0].data_ptr() if vectors[0] is not None else None,
        vectors[1].data_ptr() if vectors[1] is not None else None,
        out.data_ptr(), n, n, k, torch.get_num_threads())
    if code != 0:
        raise RuntimeError(f"blade_skinny_linear returned {code} for x {list(x.shape)}, weight {weight.dtype}")
    return out.reshape(*x.shape[:-1], n).to(x.dtype)


def qlinear(x, weight, weight_scale, bias=None, mode="weight_only", input_scale=None) -> torch.Tensor:
    """blade::qlinear (weight_only) through the kernel."""
    return linear(x, weight, bias, weight_scale)


KERNEL_Q4 = native_build.AvxKernel(
    SOURCE, "blade_skinny_linear_q4", [_P, _N, _N, _P, _P, _P, _P, _N, _N, _N, _N, ctypes.c_int],
    "the skinny CPU int4 linear kernel", "int4 layers run the reference (dequantize, then torch's GEMM)")


def supports_q4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> bool:
    """Whether the int4 entry point takes this blade::q4linear call: CPU, 1..8 rows of fp32/bf16 x, contiguous packed
    weight and fp32 scales of the op's shapes (blade.ops.quantized)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or not 1 <= rows(x) <= MAX_ROWS:
        return False
    if packed.dtype != torch.uint8 or packed.dim() != 2 or not packed.is_contiguous():
        return False
    k = 2 * packed.shape[1]
    if x.shape[-1] != k or scales.dim() != 2 or scales.shape[0] != packed.shape[0] or not scales.shape[1]:
        return False
    if k % scales.shape[1] or (k // scales.shape[1]) % 32 or scales.shape[1] > 512 or scales.dtype != torch.float32:
        return False
    if bias is not None and (bias.shape != (packed.shape[0],) or not bias.dtype.is_floating_point):
        return False
    return KERNEL_Q4.function() is not None


def q4linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """blade::q4linear through the int4 entry point, for a call `supports_q4` takes; y in x's dtype."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    flat = x.reshape(-1, k).float().contiguous()
    out = torch.empty(flat.shape[0], n, dtype=torch.float32)
    scales = scales.contiguous()
    bias = bias.float().contiguous() if bias is not None else None
    code = KERNEL_Q4.function()(
        flat.data_ptr(), flat.shape[0], k, packed.data_ptr(), scales.data_ptr(),
        bias.data_ptr() if bias is not None else None, out.data_ptr(), n, n, k, k // scales.shape[1],
        torch.get_num_threads())
    if code != 0:
        raise RuntimeError(f"blade_skinny_linear_q4 returned {code} for x {list(x.shape)}, packed {list(packed.shape)}")
    return out.reshape(*x.shape[:-1], n).to(x.dtype)
