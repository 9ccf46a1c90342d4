"""blade::flash_attention on CUDA: a FlashAttention-2-style forward kernel in Triton.

One program computes BLOCK_M query rows of one (batch, query head): it walks the keys in blocks of
BLOCK_N, keeps the running row max m and row sum l of the softmax in fp32 (online softmax, base 2:
the scale is folded into log2 space, scores * scale * log2(e), so every exponential is one exp2),
rescales its fp32 accumulator by exp2(m_old - m_new) and adds P @ V. The [Sq, Sk] scores never leave
the chip. Query head h reads key/value head h // (Hq // Hkv) (grouped-query attention, no repeat).
The output is allocated in the op's layout (blade.ops.attention.empty_output) and written through its strides.

The key loop runs in two parts: blocks that need no element masking (every key exists and, when
causal, lies at or before the block's first query row), then the rest -- the ragged tail and the
diagonal blocks of causal attention -- with bounds and causal masks. Blocks wholly above the causal
diagonal are never visited. An optional mask (bool, True = may attend, read as bytes; or float,
added to the scores) is read through the strides of its broadcast view [B, Hq, Sq, Sk] (stride 0
on broadcast dims: nothing is copied). A row whose keys are all masked keeps m = -inf; the kernel
then uses 0 in place of m, so exp2 gives 0, l stays 0 and the row is written as zeros.

Sequence lengths are runtime arguments: one compiled kernel serves every length (Triton may still
specialize an integer argument on being 1 or a multiple of 16). q, k, v may be any strided views
whose last dimension is contiguous (a transpose of [B, S, H, D] is read in place); head dims up to
256 are padded to a power of two >= 16 with masked loads. fp16, bf16 and fp32 inputs; for fp32 the
matmuls use TF32 exactly when torch.backends.cuda.matmul.allow_tf32 is set (torch's own rule),
else full fp32.

On GPU the block sizes are autotuned once per (head dims, causal, mask kind, dtypes) -- not per
sequence length -- over a handful of configs. Under TRITON_INTERPRET=1 (CPU tests) one small
config is used.
"""

import contextlib
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from blade.config import triton_autotune, triton_interpret
from blade.errors import InputError, ShapeError
from blade.ops.attention import check_attention_args, empty_output

# read once, on first use of the kernels: triton.jit fixed them as interpreted or compiled as this module loaded
INTERPRET = triton_interpret()
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@triton.jit
def _load_key_rows(ptrs, col_ok, offs_d, DIM: tl.constexpr, BLOCK: tl.constexpr, BOUND_N: tl.constexpr):
    """A [BLOCK_N, BLOCK] tile of K or V: masked only where the block overruns the keys or the head dim."""
    if BOUND_N:
        if BLOCK == DIM:
            rows = tl.load(ptrs, mask=col_ok[:, None], other=0.0)
        else:
            rows = tl.load(ptrs, mask=col_ok[:, None] & (offs_d[None, :] < DIM), other=0.0)
    else:
        if BLOCK == DIM:
            rows = tl.load(ptrs)
        else:
            rows = tl.load(ptrs, mask=offs_d[None, :] < DIM, other=0.0)
    return rows


@triton.jit
def _attend_block(acc, l_i, m_i, q, k_base, v_base, mask_base, mask_offs, start_n, offs_m, offs_n, offs_d, offs_dv,
                  row_ok, Sk, stride_kn, stride_vn, stride_mn, qk_scale,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  PLAIN: tl.constexpr, BOUND_N: tl.constexpr, CAUSAL_DIAG: tl.constexpr, MASK_KIND: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """One key block: scores, online-softmax update, acc += P @ V. Returns (acc, l, m)."""
    cols = start_n + offs_n
    col_ok = cols < Sk
    # 64-bit scalar offset of the block, 32-bit offsets within it (no overflow on long sequences)
    n64 = start_n.to(tl.int64)
    k_ptrs = k_base + n64 * stride_kn + (offs_n[:, None] * stride_kn + offs_d[None, :])
    v_ptrs = v_base + n64 * stride_vn + (offs_n[:, None] * stride_vn + offs_dv[None, :])
    k = _load_key_rows(k_ptrs, col_ok, offs_d, HEAD_DIM, BLOCK_D, BOUND_N)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)

    if PLAIN:
        # Nothing masked and scale > 0: the row max of the scaled scores is the scaled row max, and
        # scale-and-subtract is one FMA per score.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        m_use = m_new
    else:
        s = qk * qk_scale
        m_ptrs = mask_base + n64 * stride_mn + (mask_offs + offs_n[None, :] * stride_mn)
        if MASK_KIND == 2:
            if BOUND_N:
                mv = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            else:
                mv = tl.load(m_ptrs, mask=row_ok[:, None], other=0.0)
            s = s + mv.to(tl.float32) * 1.4426950408889634
        if MASK_KIND == 1:
            if BOUND_N:
                mv = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
            else:
                mv = tl.load(m_ptrs, mask=row_ok[:, None], other=0)
            s = tl.where(mv != 0, s, float("-inf"))
        if BOUND_N:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        if CAUSAL_DIAG:
            s = tl.where(offs_m[:, None] >= cols[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with every key so far masked has m = -inf: subtract 0 instead, so exp2(-inf) = 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)

    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_key_rows(v_ptrs, col_ok, offs_dv, HEAD_DIM_V, BLOCK_DV, BOUND_N)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(Q, K, V, Mask, Out,
              stride_qb, stride_qh, stride_qm,
              stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn,
              stride_mb, stride_mh, stride_mm, stride_mn,
              stride_ob, stride_oh, stride_om,
              Hq, GROUPS, Sq, Sk, qk_scale,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, FAST_PATH: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # 1-D grid, query blocks fastest: neighbouring programs share one head's K/V in L2. Causal runs
    # each head's query blocks last-first, so the heavy blocks start early and the light ones fill the tail.
    pid = tl.program_id(0)
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    if CAUSAL:
        pid_m = num_m - 1 - pid_m
    off_b = (pid_bh // Hq).to(tl.int64)
    off_h = pid_bh % Hq
    off_hk = (off_h // GROUPS).to(tl.int64)
    off_h = off_h.to(tl.int64)

    start_m = pid_m * BLOCK_M
    m64 = start_m.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq

    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh + m64 * stride_qm
              + (rows[:, None] * stride_qm + offs_d[None, :]))
    if BLOCK_D == HEAD_DIM:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    mask_base = Mask + off_b * stride_mb + off_h * stride_mh + m64 * stride_mm
    mask_offs = rows[:, None] * stride_mm

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    if CAUSAL:
        # keys j <= i only: blocks ending at or before this block's first row need no causal mask,
        # blocks starting after its last row are skipped.
        hi = tl.minimum(Sk, start_m + BLOCK_M)
        full_end = (tl.minimum(start_m + 1, Sk) // BLOCK_N) * BLOCK_N
    else:
        hi = Sk
        full_end = (Sk // BLOCK_N) * BLOCK_N

    for start_n in range(0, full_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_base, v_base, mask_base, mask_offs, start_n, offs_m,
                                      offs_n, offs_d, offs_dv, row_ok, Sk, stride_kn, stride_vn, stride_mn, qk_scale,
                                      HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                                      FAST_PATH, False, False, MASK_KIND, DOT_PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_base, v_base, mask_base, mask_offs, start_n, offs_m,
                                      offs_n, offs_d, offs_dv, row_ok, Sk, stride_kn, stride_vn, stride_mn, qk_scale,
                                      HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                                      False, True, CAUSAL, MASK_KIND, DOT_PRECISION)

    # l == 0 only where every key was masked, and there acc == 0: those rows come out as zeros.
    inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
    out = acc * inv_l[:, None]
    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh + m64 * stride_om
              + (rows[:, None] * stride_om + offs_dv[None, :]))
    if BLOCK_DV == HEAD_DIM_V:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


# (BLOCK_M, BLOCK_N, num_warps, num_stages); head dim <= 64, <= 128, and up to 256.
_SMALL_HEAD = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 3)]
_MID_HEAD = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 128, 4, 2), (64, 64, 4, 3), (128, 32, 8, 3)]
_BIG_HEAD = [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)]
_BUCKETS = {"small": _SMALL_HEAD, "mid": _MID_HEAD, "big": _BIG_HEAD}


def _bucket(block_d: int) -> str:
    return "small" if block_d <= 64 else "mid" if block_d <= 128 else "big"


def gpu_configs() -> list:
    """The autotuning candidates for a GPU, each tagged with its head-dim bucket."""
    configs = []
    for bucket, rows in _BUCKETS.items():
        for block_m, block_n, num_warps, num_stages in rows:
            cfg = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)
            cfg.blade_bucket = bucket
            configs.append(cfg)
    return configs


if INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
elif not triton_autotune():  # each head-dim bucket's first config, untimed (quick tests)
    _CONFIGS = list({c.blade_bucket: c for c in reversed(gpu_configs())}.values())
else:
    _CONFIGS = gpu_configs()


def _prune(configs, named_args, **kwargs):
    """Keep the configs of the head-dim bucket (at most 6 are timed per autotune key)."""
    args = {**named_args, **kwargs}
    bucket = _bucket(max(args["BLOCK_D"], args["BLOCK_DV"]))
    kept = [c for c in configs if getattr(c, "blade_bucket", bucket) == bucket]
    return kept or list(configs)


_attn_fwd_tuned = triton.autotune(configs=_CONFIGS, key=["HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "MASK_KIND",
                                                          "DOT_PRECISION"],
                                  prune_configs_by={"early_config_prune": _prune})(_attn_fwd)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    """blade::flash_attention through the Triton kernel (the op's spec: blade.ops.attention)."""
    check_attention_args(q, k, v, mask)
    return _forward(q, k, v, mask, scale, causal)


def _forward(q, k, v, mask, scale, causal, config: Optional[dict] = None) -> torch.Tensor:
    """Launch the kernel; `config` (BLOCK_M, BLOCK_N, num_warps, num_stages) bypasses autotuning (tests)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        raise ShapeError(f"blade::flash_attention (triton): head_dim {D} / value head_dim {Dv} above the "
                         f"kernel's {MAX_HEAD_DIM}")
    if q.dtype not in DTYPES:
        raise InputError(f"blade::flash_attention (triton): q has dtype {q.dtype}; the kernel takes "
                         "float16, bfloat16 or float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"blade::flash_attention (triton): q, k, v must share a dtype, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    devices = {t.device for t in (q, k, v) + (() if mask is None else (mask,))}
    if len(devices) != 1:
        raise InputError(f"blade::flash_attention (triton): inputs on several devices: {sorted(map(str, devices))}")

    q, k, v = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = empty_output(q, v)  # [B, Hq, Sq, Dv] laid out as the op's spec says; written through its strides
    if out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    if mask is None:
        kind, mask_arg, mask_strides = MASK_NONE, out, (0, 0, 0, 0)
    else:
        if mask.dtype == torch.bool:
            kind, mask = MASK_BOOL, mask.view(torch.uint8)
        else:
            # as the reference does: the additive mask in q's dtype (-1e9 in fp16 is -inf there too)
            kind, mask = MASK_ADD, mask.to(q.dtype)
        mask_arg = mask.expand(B, Hq, Sq, Sk)
        mask_strides = tuple(mask_arg.stride())
    dot_precision = "tf32"
    if q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        dot_precision = "ieee"

    args = (q, k, v, mask_arg, out,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *mask_strides,
            out.stride(0), out.stride(1), out.stride(2),
            Hq, Hq // Hkv, Sq, Sk, scale * math.log2(math.e))
    meta = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_DV=max(16, triton.next_power_of_2(Dv)), CAUSAL=bool(causal), MASK_KIND=kind,
                FAST_PATH=kind == MASK_NONE and scale > 0, DOT_PRECISION=dot_precision)

    def grid(m):
        return (triton.cdiv(Sq, m["BLOCK_M"]) * B * Hq,)

    kernel = _attn_fwd_tuned if config is None else _attn_fwd
    extra = {} if config is None else {"num_warps": 4, "num_stages": 1, **config}
    # Triton launches on the current CUDA device: make it q's
    on_other_gpu = q.is_cuda and q.device.index is not None and q.device.index != torch.cuda.current_device()
    with torch.cuda.device(q.device) if on_other_gpu else contextlib.nullcontext():
        kernel[grid](*args, **meta, **extra)
    return out


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> bool:
    """Whether the kernel takes these arguments (else the op's reference runs them)."""
    return (q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] <= MAX_HEAD_DIM and v.shape[-1] <= MAX_HEAD_DIM
            and len({t.device for t in (q, k, v) + (() if mask is None else (mask,))}) == 1)


__all__ = ["flash_attention", "supports", "MAX_HEAD_DIM"]
