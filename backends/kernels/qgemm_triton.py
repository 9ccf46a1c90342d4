"""blade::qlinear on CUDA: quantized GEMMs in Triton (int8 x int8 -> int32, fp8 x fp8 -> fp32, int8 weight-only).

The op's spec and reference are in blade.ops.quantized. y[..., N] = x[..., K] @ dequant(weight[N, K])ᵀ (+ bias), in
x's dtype; x is viewed as M = prod(x.shape[:-1]) rows (any M, 1 included) and K, N need not be multiples of
anything: every tail is masked.

Two kernels:

- `_quantize_rows` (modes "dynamic", "static", "fp8"): one program per row of x. A first pass over the row
  (in BLOCK_K chunks) finds amax(|x|); the row's scale is amax / 127 ("dynamic") or amax / 448 ("fp8"), or
  the given input_scale ("static"); a second pass writes x / scale rounded to int8 (round half to even, as
  torch.round; clamped to [-127, 127]) or to float8_e4m3fn, and the scale goes to a [M] fp32 vector. A row
  of zeros has scale 0: it is divided by 1 instead, quantizes to zeros and comes out as the bias, as the
  spec says. Divisions are correctly rounded (tl.math.div_rn), as torch's, so the quantized values equal
  the reference's. Rounding is done in fp32 before any cast, so the cast itself is exact: int8 by adding
  and subtracting 1.5 * 2^23 (ties to even; |v| <= 127 after the clamp); e4m3 by rounding the fp32 bits to
  three mantissa bits (ties to even) for |v| >= 2^-6 and to multiples of 2^-9 (subnormals, by adding and
  subtracting 1.5 * 2^14) below, saturating at 448. (Triton's interpreter converts fp32 -> fp8 with a
  round-half-up that can even carry into the wrong exponent, so the kernel never asks it to round.)
  The quantized activation is a separate [M, K] int8/fp8 buffer, read once more by the GEMM: a fused
  prologue would requantize every x tile once per column block of the output.

- `_qgemm`: a tiled GEMM, programs ordered in groups of GROUP_M row blocks (L2 reuse of the weight), the
  K loop over BLOCK_K with masked tails. The weight [N, K] is read in place as [K, N] tiles (its K is
  contiguous: the "K-major" B operand fp8 tensor-core dots want).
  * "dynamic" / "static": tl.dot of int8 tiles with int32 accumulation (exact);
  * "fp8": tl.dot of float8e4nv tiles with fp32 accumulation -- native on sm_89+ (Ada, Hopper). On
    Hopper the fp8 tensor-core accumulator is narrower than fp32; max_num_imprecise_acc = BLOCK_K
    promotes the partial sums into the fp32 accumulator once per K block (as cuBLAS does every 128).
    Triton's interpreter runs fp8 dots too (it upcasts the tiles to fp16 and multiplies in fp32,
    exact for e4m3 products), so the same kernel runs under TRITON_INTERPRET=1. GPUs below sm_89
    cannot hold fp8 in Triton at all: there the op's reference runs (supports() says no);
  * "weight_only": x tiles as they are (fp32/fp16/bf16), int8 weight tiles converted to x's dtype
    (exact: |w| <= 127), fp32 accumulation; for fp32 x the dot uses TF32 exactly when
    torch.backends.cuda.matmul.allow_tf32 is set (torch's rule), else full fp32.
  The epilogue is fused: acc * row_scale[m] * weight_scale[n] (+ bias[n]) in fp32, stored in x's
  dtype -- the reference's order of operations, so with fp32 x the int8 modes agree with it to an ulp
  or so (only a rounding tie of x / s landing differently could change a quantized value).

On GPU the GEMM's block sizes are autotuned per (N, K, mode, bias, dtypes) and a bucket of M (<= 16,
<= 64, <= 256, more: decode-sized rows get narrow-M blocks), not per M, so a dynamic batch does not
retune on every size; BLADE_TRITON_AUTOTUNE=0 takes each bucket's first config untimed. Under
TRITON_INTERPRET=1 (CPU tests) one small config is used (16 x 16 x 16 tiles, BLOCK_K 16 for the
quantizer: small shapes exercise every loop and tail). The interpreter's own bf16 conversions are not
exact (fp32 -> bf16 truncates, int8 -> bf16 is a bit-level reinterpretation), so bf16 x is only right on
a GPU; fp32 and fp16 are right in both.
"""

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from blade.config import triton_autotune, triton_interpret
from blade.errors import InputError
from blade.ops.quantized import check_qlinear_args

# read once, on first use of the kernels: triton.jit fixed them as interpreted or compiled as this module loaded
INTERPRET = triton_interpret()
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# kernel modes (constexpr)
WEIGHT_ONLY, INT8, FP8 = 0, 1, 2
QUANT_DYNAMIC, QUANT_STATIC, QUANT_FP8 = 0, 1, 2
_GEMM_MODE = {"weight_only": WEIGHT_ONLY, "dynamic": INT8, "static": INT8, "fp8": FP8}
_QUANT_MODE = {"dynamic": QUANT_DYNAMIC, "static": QUANT_STATIC, "fp8": QUANT_FP8}


@triton.jit
def _round_int8(v):
    """v (fp32, |v| <= 127) rounded to an integer, ties to even, still fp32."""
    return (v + 12582912.0) - 12582912.0  # 1.5 * 2^23: the sum's ulp is 1 for |v| < 2^22


@triton.jit
def _round_e4m3(v):
    """v (fp32) rounded to the nearest float8_e4m3fn value, ties to even, saturating at +-448; still fp32."""
    a = tl.minimum(tl.abs(v), 448.0)
    # normal range (a >= 2^-6): keep 3 mantissa bits, round to nearest even on the 20 dropped ones
    bits = a.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 == 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    # subnormal range: multiples of 2^-9 (1.5 * 2^14 has ulp 2^-9)
    small = (a + 24576.0) - 24576.0
    r = tl.where(a < 0.015625, small, normal)
    return tl.where(v < 0, -r, r)


@triton.jit
def _quantize_rows(X, Q, Scale, K, stride_xm, input_scale,
                   QUANT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row m of x -> Q[m, :] (int8 or fp8) and Scale[m] (fp32)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    q_row = Q + row * K
    offs = tl.arange(0, BLOCK_K)
    if QUANT == 1:
        scale = input_scale
        safe = scale
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + offs
            x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        top = tl.max(amax, 0)
        if QUANT == 0:
            scale = tl.math.div_rn(top, 127.0)
        else:
            scale = tl.math.div_rn(top, 448.0)
        safe = tl.where(scale > 0.0, scale, 1.0)
    for start in range(0, K, BLOCK_K):
        cols = start + offs
        ok = cols < K
        x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, safe)
        if QUANT == 2:
            tl.store(q_row + cols, _round_e4m3(v).to(Q.dtype.element_ty), mask=ok)
        else:
            v = tl.minimum(tl.maximum(v, -127.0), 127.0)
            tl.store(q_row + cols, _round_int8(v).to(tl.int8), mask=ok)
    tl.store(Scale + row, scale)


@triton.jit
def _qgemm(A, W, RowScale, WScale, Bias, Out, M, N, K,
           stride_am, stride_wn, stride_wk, stride_om,
           MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, M_BUCKET: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Out[M, N] = (A[M, K] @ W[N, K]ᵀ) * RowScale[m] * WScale[n] (+ Bias[n]); A's K is contiguous."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < M
    col_ok = offs_n < N
    a_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = W + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk

    if MODE == 1:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k_ok = (start + offs_k) < K
        a_mask = row_ok[:, None] & k_ok[None, :]
        w_mask = k_ok[:, None] & col_ok[None, :]
        if MODE == 1:
            a = tl.load(a_ptrs, mask=a_mask, other=0)
            w = tl.load(w_ptrs, mask=w_mask, other=0)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        elif MODE == 2:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)
            acc = tl.dot(a, w, acc, max_num_imprecise_acc=BLOCK_K, out_dtype=tl.float32)
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            w = tl.load(w_ptrs, mask=w_mask, other=0)
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    out = acc.to(tl.float32)
    if MODE != 0:
        row_scale = tl.load(RowScale + offs_m, mask=row_ok, other=0.0)
        out = out * row_scale[:, None]
    w_scale = tl.load(WScale + offs_n, mask=col_ok, other=0.0)
    out = out * w_scale[None, :]
    if HAS_BIAS:
        bias = tl.load(Bias + offs_n, mask=col_ok, other=0.0).to(tl.float32)
        out = out + bias[None, :]
    o_ptrs = Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per bucket of M; each bucket's first is its untimed pick.
_DECODE = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (16, 32, 256, 4, 3), (32, 64, 128, 4, 4), (16, 64, 64, 2, 5),
           (32, 128, 64, 4, 4)]
_SMALL = [(64, 64, 128, 4, 3), (32, 64, 128, 4, 4), (64, 128, 64, 4, 4), (32, 128, 128, 4, 3), (64, 64, 64, 4, 4),
          (64, 32, 128, 4, 4)]
_MID = [(128, 128, 64, 4, 4), (64, 128, 128, 4, 3), (128, 64, 128, 4, 3), (64, 64, 128, 4, 4), (128, 128, 128, 8, 3),
        (64, 128, 64, 4, 4)]
_LARGE = [(128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3),
          (128, 64, 128, 4, 4), (64, 128, 128, 4, 4)]
_BUCKETS = {16: _DECODE, 64: _SMALL, 256: _MID, 1024: _LARGE}
GROUP_M = 8


def m_bucket(m: int) -> int:
    """The autotuning bucket of a row count: 16, 64, 256 or 1024 (anything above 256)."""
    return next((b for b in (16, 64, 256) if m <= b), 1024)


def gpu_configs() -> list:
    """The GEMM's autotuning candidates for a GPU, each tagged with its bucket of M."""
    configs = []
    for bucket, rows in _BUCKETS.items():
        for block_m, block_n, block_k, num_warps, num_stages in rows:
            cfg = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": GROUP_M},
                                num_warps=num_warps, num_stages=num_stages)
            cfg.blade_bucket = bucket
            configs.append(cfg)
    return configs


if INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1)]
    QUANT_BLOCK_K = 16
elif not triton_autotune():  # each bucket's first config, untimed (quick tests)
    _CONFIGS = list({c.blade_bucket: c for c in reversed(gpu_configs())}.values())
    QUANT_BLOCK_K = 2048
else:
    _CONFIGS = gpu_configs()
    QUANT_BLOCK_K = 2048


def _prune(configs, named_args, **kwargs):
    """Keep the configs of the M bucket whose K tile fits K (at most 6 are timed per autotune key)."""
    args = {**named_args, **kwargs}
    bucket = args["M_BUCKET"]
    kept = [c for c in configs if getattr(c, "blade_bucket", bucket) == bucket]
    fitting = [c for c in kept if c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(args["K"]))]
    return fitting or kept or list(configs)


_qgemm_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K", "M_BUCKET", "MODE", "HAS_BIAS", "DOT_PRECISION"],
                               prune_configs_by={"early_config_prune": _prune})(_qgemm)


def qlinear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
            mode: str = "dynamic", input_scale: Optional[float] = None) -> torch.Tensor:
    """blade::qlinear through the Triton kernels (the op's spec: blade.ops.quantized)."""
    check_qlinear_args(x, weight, weight_scale, bias, mode, input_scale)  # dtype of x, static's scale, shapes
    devices = {t.device for t in (x, weight, weight_scale) + (() if bias is None else (bias,))}
    if len(devices) != 1:
        raise InputError(f"blade::qlinear (triton): inputs on several devices: {sorted(map(str, devices))}")
    return _forward(x, weight, weight_scale, bias, mode, input_scale)


def _forward(x, weight, weight_scale, bias, mode, input_scale, config: Optional[dict] = None) -> torch.Tensor:
    """Quantize x (activation modes) and launch the GEMM; `config` (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    num_warps, num_stages) bypasses autotuning (tests)."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.reshape(*x.shape[:-1], N)
    if K > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    weight_scale = weight_scale.to(torch.float32).contiguous()
    bias = None if bias is None else bias.contiguous()
    gemm_mode = _GEMM_MODE[mode]

    on_other_gpu = x.is_cuda and x.device.index is not None and x.device.index != torch.cuda.current_device()
    with torch.cuda.device(x.device) if on_other_gpu else contextlib.nullcontext():
        if gemm_mode == WEIGHT_ONLY:
            a, row_scale, stride_am = x2, weight_scale, x2.stride(0)  # row_scale unused
        else:
            a = torch.empty((M, K), dtype=torch.float8_e4m3fn if mode == "fp8" else torch.int8, device=x.device)
            row_scale = torch.empty((M,), dtype=torch.float32, device=x.device)
            stride_am = K
            block_k = min(QUANT_BLOCK_K, max(16, triton.next_power_of_2(K)))
            _quantize_rows[(M,)](x2, a, row_scale, K, x2.stride(0),
                                 float(input_scale) if mode == "static" else 1.0,
                                 QUANT=_QUANT_MODE[mode], BLOCK_K=block_k,
                                 num_warps=4 if block_k <= 512 or INTERPRET else 8)
        dot_precision = "tf32"
        if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
            dot_precision = "ieee"

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        args = (a, weight, row_scale, weight_scale, weight_scale if bias is None else bias, out, M, N, K,
                stride_am, weight.stride(0), weight.stride(1), out.stride(0))
        meta = dict(MODE=gemm_mode, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision, M_BUCKET=m_bucket(M))
        if config is None:
            _qgemm_tuned[grid](*args, **meta)
        else:
            _qgemm[grid](*args, **meta, **{"GROUP_M": GROUP_M, "num_warps": 4, "num_stages": 1, **config})
    return out.reshape(*x.shape[:-1], N)


def supports(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
             mode: str = "dynamic", input_scale: Optional[float] = None) -> bool:
    """Whether the kernels take these arguments (else the op's reference runs them)."""
    if x.dtype not in DTYPES or (mode == "static" and input_scale is None):
        return False
    if len({t.device for t in (x, weight, weight_scale) + (() if bias is None else (bias,))}) != 1:
        return False
    if x.is_cuda and mode != "weight_only":
        capability = torch.cuda.get_device_capability(x.device)
        # fp8 tensors and dots need sm_89+ in Triton; int8 tensor-core dots sm_80+
        return capability >= ((8, 9) if mode == "fp8" else (8, 0))
    return True


__all__ = ["qlinear", "supports"]
