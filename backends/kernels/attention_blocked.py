"""blade::flash_attention's blocked CPU kernel for bf16: query blocks through PyTorch's bf16 GEMM and softmax kernels.

PyTorch's fused CPU attention (SDPA flash) runs bf16 no faster than fp32 on AVX512-BF16 CPUs without
AMX (bench/results/attention_cpu.md); its per-block GEMMs do not reach the bf16 matmul peak. This
kernel takes a block of BLOCK_ROWS queries at a time, all heads together:

    scores = scale·q_block @ k[:, :, :end]ᵀ        bf16 GEMM, fp32 accumulation, bf16 scores
                                                    (+ a padding mask, as the GEMM's bias)
    probs  = softmax(scores)                        PyTorch's kernel, fp32 inside
    out[block] = probs @ v[:, :, :end]

so memory is O(BLOCK_ROWS·Sk) per head, never O(Sq·Sk), and under `causal` a block reads only the keys
up to its last query (the upper triangle is never computed; only the block on the diagonal is masked).
The scores are rounded to bf16 before the softmax, as `model.to(torch.bfloat16)` rounds them: the
op-level error against fp32 is about 3e-3 where SDPA's is 2e-3 (tests/backends/test_attention_cpu.py).
Grouped-query heads share their key/value head without copying it (the group's queries are stacked
as rows of one GEMM). Rows whose keys are all masked give zeros, as the op's spec says.

Other dtypes (fp32, and fp16, which these CPUs have no fast GEMM for) run the reference. Where this kernel runs among
the op's CPU kernels (after the fused native one, at MIN_KEYS keys or more): registry.py.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from blade.ops.attention import check_attention_args

BLOCK_ROWS = 128  # queries per block (64 and 256 were slower at seq 256-2048)
MIN_KEYS = 128  # below this many keys SDPA is as fast or faster (bench/results/attention_cpu.md)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    """bf16 q/k/v on the CPU (and a bool or floating mask): what this kernel computes."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16
            and (mask is None or mask.dtype == torch.bool or mask.dtype.is_floating_point))


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    """The op on bf16 CPU tensors, a block of queries at a time (see the module docstring)."""
    check_attention_args(q, k, v, mask)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    v_dim = v.shape[-1]
    out = q.new_empty((batch, q_len, q_heads, v_dim))
    out_heads = out.transpose(1, 2)  # [B, Hq, Sq, Dv] view of the [B, Sq, Hq, Dv] memory
    if out.numel() == 0 or k_len == 0:  # nothing to compute; no keys at all: every row is fully masked
        return out_heads.zero_()
    if mask is not None:
        mask = torch.atleast_2d(mask)  # [Sk] is [1, Sk]: every later step may read the mask's last two dims
    if mask is not None and mask.dtype != torch.bool:
        mask = _shifted_to_zero_max(mask).to(q.dtype)
    # only -inf can leave a row with no key (a finite additive mask such as BERT's -10000 never does): one
    # check per call spares every block the search for dead rows
    may_kill_rows = mask is not None and (mask.dtype == torch.bool or bool(torch.isneginf(mask).any()))
    by_key_only = mask is not None and mask.dtype != torch.bool and _varies_by_key_only(mask)
    # One contiguous copy of K and V (row copies), so that each block's GEMMs read them in place (K
    # transposed through the BLAS flag): a strided view would be copied again by every block.
    keys_t = k.contiguous().transpose(-1, -2).reshape(batch * kv_heads, head_dim, k_len)
    values = v.contiguous().reshape(batch * kv_heads, k_len, v_dim)
    for start in range(0, q_len, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, q_len)
        rows = stop - start
        k_end = min(stop, k_len) if causal else k_len
        # the group's queries as rows of one GEMM against their shared key head
        q_block = q[:, :, start:stop].reshape(batch * kv_heads, group * rows, head_dim)
        block_mask = None if mask is None else _block(mask, start, stop, k_end)
        # scores = scale·q·kᵀ (+ a padding mask, which varies by key only: the GEMM adds it as its bias)
        if by_key_only:
            bias = block_mask.expand(batch, kv_heads, 1, k_end).reshape(batch * kv_heads, 1, k_end)
            scores = torch.baddbmm(bias, q_block, keys_t[..., :k_end], alpha=scale)
        else:
            scores = torch.baddbmm(q_block.new_empty(batch * kv_heads, group * rows, k_end), q_block,
                                   keys_t[..., :k_end], beta=0.0, alpha=scale)
        scores_heads = scores.view(batch, q_heads, rows, k_end)
        if causal and start < k_end:  # an add of a cached 0/-inf triangle: cheaper than masked_fill_ with a bool mask
            scores_heads[..., start:].add_(_above_diagonal(rows, k_end - start, scores.dtype))
        dead = None
        if block_mask is not None:
            if block_mask.dtype == torch.bool:
                scores_heads.masked_fill_(~block_mask, float("-inf"))
                allowed = block_mask
            else:
                if not by_key_only:
                    scores_heads.add_(block_mask)
                allowed = block_mask != float("-inf")
            if may_kill_rows:
                dead = ~_any_allowed(allowed, causal, start, rows, k_end)
        probs = torch.softmax(scores, dim=-1)
        block_out = torch.bmm(probs, values[:, :k_end]).view(batch, q_heads, rows, v_dim)
        if dead is not None and bool(dead.any()):
            block_out = block_out.masked_fill(dead.unsqueeze(-1), 0.0)
        out_heads[:, :, start:stop].copy_(block_out)
    return out_heads


SHIFT_LIMIT = 2.0 ** 16  # fp32 keeps scores added to a mask value below this; bf16 (spacing 64 near 10000) does not


def _shifted_to_zero_max(mask: torch.Tensor) -> torch.Tensor:
    """The additive mask less its largest entry per row, where that is finite and below SHIFT_LIMIT: softmax ignores
    a constant per row, and a row masked whole by a moderate constant (BERT's -10000 over an all-padding sequence)
    would otherwise be added to bf16 scores that round away, where the fp32 model keeps them. A row masked by a
    huge value (-1e9) is left alone: fp32 loses its scores too, and both average the values."""
    top = mask.amax(dim=-1, keepdim=True)
    top = torch.where(top.abs() < SHIFT_LIMIT, top, 0.0)  # also maps ±inf and NaN to 0
    return mask - top if bool(top.any()) else mask


@functools.lru_cache(maxsize=64)
def _above_diagonal(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, width]: -inf above the diagonal, 0 on and below it (never written: shared by every call of that shape;
    made outside inference mode, so that a call with autograd on may use it too). Added to scores it masks like
    masked_fill, except that a score of +inf there (only from inputs that overflow bf16) would become NaN."""
    with torch.inference_mode(False):
        above = torch.ones(rows, width, dtype=torch.bool).triu_(1)
        return torch.zeros(rows, width, dtype=dtype).masked_fill_(above, float("-inf"))


def _varies_by_key_only(mask: torch.Tensor) -> bool:
    """A mask (2-D or more) of shape [..., 1, 1, Sk] or [1, Sk]: one value per batch and key, the same for every head and query."""
    return mask.shape[-2] == 1 and (mask.dim() == 2 or mask.shape[-3] == 1)


def _block(mask: torch.Tensor, start: int, stop: int, k_end: int) -> torch.Tensor:
    """The mask's part for queries [start, stop) and keys [0, k_end), still broadcastable."""
    mask = mask[..., :k_end] if mask.shape[-1] != 1 else mask
    if mask.dim() >= 2 and mask.shape[-2] != 1:
        mask = mask[..., start:stop, :]
    return mask


def _any_allowed(allowed: torch.Tensor, causal: bool, start: int, rows: int, k_end: int) -> torch.Tensor:
    """Per query row of the block: does any key stay allowed by the mask (and, under causal, the triangle)?"""
    if causal:
        key = torch.arange(k_end)
        query = torch.arange(start, start + rows).unsqueeze(-1)
        allowed = allowed & (key <= query)
    return allowed.any(dim=-1)


def prefers_blocked(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], causal: bool) -> bool:
    """Where bench/results/attention_cpu.md measured this kernel faster than SDPA's: at MIN_KEYS keys or more."""
    return k.shape[2] >= MIN_KEYS
