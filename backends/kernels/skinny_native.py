"""Build, load and call skinny_linear.cpp, blade's CPU kernel for linear layers over few rows (a decode step).

torch's GEMM reads a weight at 13-18 GB/s for one row here and slower for eight (bench/results/llm_cpu.md); this
kernel streams each weight row once for all rows of x (up to 8 at a time), at the memory's speed. It takes fp32 or
bf16 x (bf16 is widened to fp32 first), a contiguous [out, in] weight in fp32, bf16 or int8 with a scale per row, an
optional bias; sums are fp32, the result in x's dtype. A bf16 model's call (bf16 x, weight and bias) on a CPU with
AVX512-BF16 reads x and writes y in bf16 in place, through vdpbf16ps (`uses_bf16_dot`). It takes 1..MAX_ROWS rows
of x with an fp32 or bf16 weight (torch's GEMM is faster beyond) and 1..MAX_QUANTIZED_ROWS with an int8 or int4
weight (int4: groups of any multiple of 32 weights dividing the row), 8 rows a pass over the
weight: there the alternative, the op's reference, first dequantizes the whole weight, which cost 2-8x the kernel's
time at 32 rows (a short prompt's prefill) and more than it from about 200 int4 rows on this 2-core CPU. Built like
attention_native (native_build, once per machine); where the CPU lacks AVX-512 or the build fails (warned once)
`library()` is None and the callers run PyTorch.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Optional

import torch

from blade.backends.kernels import native_build

SOURCE = Path(__file__).with_name("skinny_linear.cpp")
MAX_ROWS = 8
MAX_QUANTIZED_ROWS = 128
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
    """Whether the kernel takes this call (and runs here): CPU, 1..MAX_ROWS rows of fp32/bf16 x (MAX_QUANTIZED_ROWS
    for an int8 weight), a contiguous 2-D weight of a kind it reads whose width matches, an fp32-castable 1-D bias
    and scale of the right length."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or weight.device.type != "cpu":
        return False
    if weight.dim() != 2 or weight.dtype not in WEIGHT_KINDS or not weight.is_contiguous():
        return False
    most = MAX_QUANTIZED_ROWS if weight.dtype == torch.int8 else MAX_ROWS
    if x.dim() == 0 or x.shape[-1] != weight.shape[1] or not 1 <= rows(x) <= most:
        return False
    if (weight.dtype == torch.int8) != (scale is not None):
        return False
    for vector in (bias, scale):
        if vector is not None and (vector.shape != (weight.shape[0],) or not vector.dtype.is_floating_point):
            return False
    return library() is not None


@functools.lru_cache(maxsize=1)
def has_bf16_dot() -> bool:
    """Whether this CPU has AVX512-BF16's vdpbf16ps."""
    from blade.target import detect

    return "avx512_bf16" in detect("cpu").features


def uses_bf16_dot(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether this call takes the kernel's bf16 path (weight kind 3): bf16 x, weight and bias, a contiguous x and
    a CPU with AVX512-BF16."""
    if x.dtype is not torch.bfloat16 or weight.dtype is not torch.bfloat16 or not x.is_contiguous():
        return False
    if bias is not None and (bias.dtype is not torch.bfloat16 or not bias.is_contiguous()):
        return False
    return has_bf16_dot()


def fp32_pointer(t: Optional[torch.Tensor]):
    """The address of `t` as contiguous fp32 and the tensor that holds it (a copy when `t` is not that already)."""
    if t is None:
        return None, None
    if t.dtype is not torch.float32 or not t.is_contiguous():
        t = t.float().contiguous()
    return t.data_ptr(), t


def fp32_address(t: Optional[torch.Tensor]):
    """The address of `t` where it is contiguous fp32 already (or None), else False: the copy-free common case of
    fp32_pointer without building a tuple (a decode step makes ~60 kernel calls)."""
    if t is None:
        return None
    if t.dtype is torch.float32 and t.is_contiguous():
        return t.data_ptr()
    return False


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ (weight · scale)ᵀ + bias for a call `supports` takes; y in x's dtype. A decode step makes ~50 of these
    calls, so fp32 x is read in place and y written in its final shape (no reshapes or casts around the kernel)."""
    n, k = weight.shape
    if scale is None and uses_bf16_dot(x, weight, bias):
        out = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
        code = library()(x.data_ptr(), x.numel() // k, k, weight.data_ptr(), 3, None,
                         None if bias is None else bias.data_ptr(), out.data_ptr(), n, n, k, torch.get_num_threads())
        if code != 0:
            raise RuntimeError(f"blade_skinny_linear returned {code} for bf16 x {list(x.shape)}")
        return out
    x_ptr, scale_ptr, bias_ptr = fp32_address(x), fp32_address(scale), fp32_address(bias)
    if x_ptr is False or scale_ptr is False or bias_ptr is False:
        held = fp32_pointer(x), fp32_pointer(scale), fp32_pointer(bias)  # the copies live until the call returns
        x_ptr, scale_ptr, bias_ptr = (address for address, _ in held)
    out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    code = library()(x_ptr, x.numel() // k, k, weight.data_ptr(), WEIGHT_KINDS[weight.dtype], scale_ptr, bias_ptr,
                     out.data_ptr(), n, n, k, torch.get_num_threads())
    if code != 0:
        raise RuntimeError(f"blade_skinny_linear returned {code} for x {list(x.shape)}, weight {weight.dtype}")
    return out if x.dtype is torch.float32 else out.to(x.dtype)


def qlinear(x, weight, weight_scale, bias=None, mode="weight_only", input_scale=None) -> torch.Tensor:
    """blade::qlinear (weight_only) through the kernel."""
    return linear(x, weight, bias, weight_scale)


KERNEL_Q4 = native_build.AvxKernel(
    SOURCE, "blade_skinny_linear_q4", [_P, _N, _N, _P, _P, _P, _P, _N, _N, _N, _N, ctypes.c_int],
    "the skinny CPU int4 linear kernel", "int4 layers run the reference (dequantize, then torch's GEMM)")


def supports_q4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> bool:
    """Whether the int4 entry point takes this blade::q4linear call: CPU, 1..MAX_QUANTIZED_ROWS rows of fp32/bf16 x,
    contiguous packed weight and fp32 scales of the op's shapes (blade.ops.quantized)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if not 1 <= rows(x) <= MAX_QUANTIZED_ROWS:
        return False
    if packed.dtype != torch.uint8 or packed.dim() != 2 or not packed.is_contiguous():
        return False
    k = 2 * packed.shape[1]
    if x.shape[-1] != k or scales.dim() != 2 or scales.shape[0] != packed.shape[0] or not scales.shape[1]:
        return False
    if k % scales.shape[1] or (k // scales.shape[1]) % 32 or scales.dtype != torch.float32:
        return False
    if bias is not None and (bias.shape != (packed.shape[0],) or not bias.dtype.is_floating_point):
        return False
    return KERNEL_Q4.function() is not None


def q4linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """blade::q4linear through the int4 entry point, for a call `supports_q4` takes; y in x's dtype."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    x_ptr, scales_ptr, bias_ptr = fp32_address(x), fp32_address(scales), fp32_address(bias)
    if x_ptr is False or scales_ptr is False or bias_ptr is False:
        held = fp32_pointer(x), fp32_pointer(scales), fp32_pointer(bias)  # the copies live until the call returns
        x_ptr, scales_ptr, bias_ptr = (address for address, _ in held)
    out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    code = KERNEL_Q4.function()(x_ptr, x.numel() // k, k, packed.data_ptr(), scales_ptr, bias_ptr, out.data_ptr(),
                                n, n, k, k // scales.shape[1], torch.get_num_threads())
    if code != 0:
        raise RuntimeError(f"blade_skinny_linear_q4 returned {code} for x {list(x.shape)}, packed {list(packed.shape)}")
    return out if x.dtype is torch.float32 else out.to(x.dtype)
