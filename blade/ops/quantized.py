"""blade's quantized operators (namespace `blade`): their exact spec, reference and fake implementations.

`blade::qlinear(x, weight, weight_scale, bias=None, mode="dynamic", input_scale=None) -> y`

    x: [..., K] float (fp32, fp16 or bf16)      weight: [N, K] int8, or float8_e4m3fn for mode "fp8"
    weight_scale: [N] fp32, one per output channel (symmetric: weight ≈ weight_q * weight_scale[:, None])
    bias: [N] or None                            y: [..., N] in x's dtype
    mode "weight_only": y = x @ (weight_q * weight_scale[:, None])ᵀ + bias (x stays in floating point)
    mode "dynamic":     per token (row of x) s = amax(|x_row|) / 127; x_q = round(x / s) in [-127, 127];
                        y = (x_q @ weight_qᵀ, int32 accumulation) * s * weight_scale + bias
    mode "static":      the same with s = input_scale, one calibrated number for the tensor (x_q clamped)
    mode "fp8":         per token s = amax(|x_row|) / 448; x_8 = e4m3(x / s);
                        y = (x_8 @ weight_8ᵀ, fp32 accumulation) * s * weight_scale + bias
    round() is half to even (torch.round). A row of zeros has s = 0 and gives y = bias. The reference computes in fp32, which is exact for the
    integer products of the int8 modes up to rounding of sums beyond 2^24.

`blade::q4linear(x, packed, scales, bias=None) -> y`  (weight-only int4, group-wise)

    x: [..., K] float            packed: [N, K/2] uint8        scales: [N, K/G] fp32, one per group of G weights
    G = K / scales.shape[1], a multiple of 32. Within each 32 weights of a row, byte j (0..15) holds weight j in
    its low nibble and weight j + 16 in its high one, each as q + 8 with q in [-8, 7]; weight = q * scale of
    its group (symmetric: scale = amax(|group|) / 7, q = clamp(round(w / scale), -8, 7)).
    y = x @ dequantized(packed, scales)ᵀ + bias, in x's dtype. 4.5 bits a weight at G = 32 (0.14x of fp32).

`blade::qembedding(table, row_scale, indices) -> rows`

    table: [V, D] int8    row_scale: [V] fp32    indices: any shape, int64/int32    rows: [*indices.shape, D] fp32
    rows = table[indices] * row_scale[indices, None]: only the rows read are dequantized (the table
    stays int8 in memory, ~0.27x of fp32 for D = 64).

blade::qlinear's implementation here is the reference; its CUDA kernels (Triton) are chosen per call by
blade.backends.kernels.registry, which blade.backends registers as the op's CPU and CUDA implementation.
"""
from __future__ import annotations

from typing import Optional

import torch

from blade.errors import ShapeError

MODES = ("weight_only", "dynamic", "static", "fp8")
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def check_qlinear_args(x, weight, weight_scale, bias, mode, input_scale=None) -> None:
    """Raise ShapeError naming the argument when the call breaks the op's spec."""
    if mode not in MODES:
        raise ShapeError(f"blade::qlinear: mode {mode!r} is not one of {MODES}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ShapeError(f"blade::qlinear: x must be float32, float16 or bfloat16, got {x.dtype}")
    if mode == "static" and not (input_scale is not None and input_scale > 0):
        raise ShapeError(f"blade::qlinear (static): input_scale must be a positive number, got {input_scale!r}")
    want = torch.float8_e4m3fn if mode == "fp8" else torch.int8
    if weight.dtype != want or weight.dim() != 2:
        raise ShapeError(f"blade::qlinear ({mode}): weight must be a 2-D {want} [out, in] tensor, got "
                         f"{weight.dtype}{list(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ShapeError(f"blade::qlinear: x has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    if weight_scale.shape != (weight.shape[0],):
        raise ShapeError(f"blade::qlinear: weight_scale must be [{weight.shape[0]}], got {list(weight_scale.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ShapeError(f"blade::qlinear: bias must be [{weight.shape[0]}], got {list(bias.shape)}")


def quantize_rows(x: torch.Tensor, mode: str, input_scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x quantized as floats holding the quantized values, the scale per row [..., 1]) for an activation mode."""
    x = x.float()
    if mode == "static":
        scale = torch.full((*x.shape[:-1], 1), float(input_scale), device=x.device)
        return torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX), scale
    top = INT8_MAX if mode == "dynamic" else FP8_MAX
    scale = x.abs().amax(dim=-1, keepdim=True) / top
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = x / safe
    if mode == "dynamic":
        return torch.clamp(torch.round(scaled), -INT8_MAX, INT8_MAX), scale
    return scaled.to(torch.float8_e4m3fn).float(), scale


def qlinear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, mode: str = "dynamic",
                      input_scale: Optional[float] = None) -> torch.Tensor:
    """The op's meaning, in fp32 PyTorch."""
    check_qlinear_args(x, weight, weight_scale, bias, mode, input_scale)
    if mode == "weight_only":
        out = x.float() @ (weight.float() * weight_scale[:, None].float()).t()
    else:
        x_q, scale = quantize_rows(x, mode, input_scale)
        out = (x_q @ weight.float().t()) * scale * weight_scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@torch.library.custom_op("blade::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
            mode: str = "dynamic", input_scale: Optional[float] = None) -> torch.Tensor:
    return qlinear_reference(x, weight, weight_scale, bias, mode, input_scale)


@qlinear.register_fake
def _qlinear_fake(x, weight, weight_scale, bias=None, mode="dynamic", input_scale=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def qembedding_reference(table: torch.Tensor, row_scale: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    if table.dtype != torch.int8 or table.dim() != 2 or row_scale.shape != (table.shape[0],):
        raise ShapeError(f"blade::qembedding: table must be int8 [rows, dim] with row_scale [rows], got "
                         f"{table.dtype}{list(table.shape)} and {list(row_scale.shape)}")
    return table[indices].float() * row_scale[indices].float().unsqueeze(-1)


@torch.library.custom_op("blade::qembedding", mutates_args=())
def qembedding(table: torch.Tensor, row_scale: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return qembedding_reference(table, row_scale, indices)


@qembedding.register_fake
def _qembedding_fake(table, row_scale, indices):
    return table.new_empty((*indices.shape, table.shape[1]), dtype=torch.float32)


def quantize_weight(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_q, weight_scale): symmetric per output channel (row), int8 or float8_e4m3fn for "fp8"."""
    w = weight.detach().float()
    top = FP8_MAX if mode == "fp8" else INT8_MAX
    scale = w.abs().amax(dim=1) / top
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = w / safe[:, None]
    if mode == "fp8":
        return scaled.to(torch.float8_e4m3fn), scale
    return torch.clamp(torch.round(scaled), -INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_table(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, fp32 scale per row) of an embedding table."""
    return quantize_weight(table, "dynamic")


INT4_GROUP = 32  # weights per scale
INT4_MAX = 7.0


def check_q4linear_args(x, packed, scales, bias) -> None:
    """Raise ShapeError naming the argument when a blade::q4linear call breaks the op's spec."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ShapeError(f"blade::q4linear: x must be float32, float16 or bfloat16, got {x.dtype}")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ShapeError(f"blade::q4linear: packed must be a 2-D uint8 [out, in / 2] tensor, got "
                         f"{packed.dtype}{list(packed.shape)}")
    k = 2 * packed.shape[1]
    if x.shape[-1] != k:
        raise ShapeError(f"blade::q4linear: x has {x.shape[-1]} features, the packed weight holds {k}")
    groups = scales.shape[1] if scales.dim() == 2 else 0
    if scales.dim() != 2 or scales.shape[0] != packed.shape[0] or not groups or k % groups or (k // groups) % 32:
        raise ShapeError(f"blade::q4linear: scales must be [{packed.shape[0]}, {k} / G] for a group size G that is a "
                         f"multiple of 32, got {list(scales.shape)}")
    if bias is not None and bias.shape != (packed.shape[0],):
        raise ShapeError(f"blade::q4linear: bias must be [{packed.shape[0]}], got {list(bias.shape)}")


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed [N, K/2] uint8, scales [N, K/group] fp32) of a [N, K] weight, K a multiple of `group` (and 32)."""
    w = weight.detach().float()
    n, k = w.shape
    if group % 32 or k % group:
        raise ShapeError(f"int4 quantization: {k} input features are not a multiple of the group size {group} "
                         "(itself a multiple of 32)")
    grouped = w.reshape(n, k // group, group)
    scales = grouped.abs().amax(dim=-1) / INT4_MAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.clamp(torch.round(grouped / safe[..., None]), -8, 7).to(torch.int16) + 8
    chunks = q.reshape(n, k // 32, 2, 16)  # per 32: weights 0..15 low nibbles, 16..31 high nibbles
    packed = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).to(torch.uint8).reshape(n, k // 2)
    return packed.contiguous(), scales.contiguous()


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 [N, K] weight that (packed, scales) stand for."""
    n, half = packed.shape
    k = 2 * half
    bytes_ = packed.reshape(n, k // 32, 16).to(torch.int16)
    q = torch.stack([bytes_ & 0x0F, bytes_ >> 4], dim=2).reshape(n, k).float() - 8
    return (q.reshape(n, scales.shape[1], -1) * scales.float()[..., None]).reshape(n, k)


def q4linear_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """blade::q4linear's meaning, in fp32 PyTorch."""
    check_q4linear_args(x, packed, scales, bias)
    out = x.float() @ dequantize_int4(packed, scales).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@torch.library.custom_op("blade::q4linear", mutates_args=())
def q4linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return q4linear_reference(x, packed, scales, bias)


@q4linear.register_fake
def _q4linear_fake(x, packed, scales, bias=None):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


QLINEAR = torch.ops.blade.qlinear.default
Q4LINEAR = torch.ops.blade.q4linear.default
QEMBEDDING = torch.ops.blade.qembedding.default
