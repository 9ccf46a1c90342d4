"""blade's own operators (namespace `blade`): their exact spec, reference and fake implementations.

`blade::flash_attention(q, k, v, mask=None, scale=None, causal=False) -> out`

    q: [B, Hq, Sq, D]    k: [B, Hkv, Sk, D]    v: [B, Hkv, Sk, Dv]    out: [B, Hq, Sq, Dv], q's dtype
    Hq must be a multiple of Hkv; query head h reads key/value head h // (Hq // Hkv)
    (grouped-query attention, the repeat never materialized).
    scores = scale * q @ kᵀ, with scale = 1 / sqrt(D) when None.
    mask, broadcastable to [B, Hq, Sq, Sk]: bool (True = may attend) or float (added to the scores).
    causal: query i may attend key j only where j <= i (top-left aligned, as SDPA's is_causal),
    combined with the mask.
    out = softmax(scores) @ v with fp32 softmax; a query row whose keys are all masked gives zeros.
    out's memory is laid out [B, Sq, Hq, Dv] (as SDPA's), so out.transpose(1, 2) is contiguous:
    graphs captured around SDPA `view` that transpose, and hand-written ones copy it for free.

The op's implementation here is the reference, PyTorch's scaled_dot_product_attention, which on CPU and CUDA
never materializes the [Sq, Sk] scores for the common cases. blade's own kernels (CPU and CUDA) are chosen per call
by blade.backends.kernels.registry, which blade.backends registers as the op's CPU and CUDA implementation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from blade.errors import ShapeError


def check_attention_args(q, k, v, mask=None) -> None:
    """Raise ShapeError naming the argument when q, k, v, mask break the op's spec."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ShapeError(f"blade::flash_attention: {name} must be 4-D [batch, heads, seq, head_dim], "
                             f"got shape {tuple(t.shape)}")
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0]:
        raise ShapeError(f"blade::flash_attention: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, "
                         f"v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ShapeError(f"blade::flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must share "
                         "heads and sequence length")
    if q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"blade::flash_attention: q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ShapeError(f"blade::flash_attention: query heads {q.shape[1]} are not a multiple of key/value "
                         f"heads {k.shape[1]}")
    if mask is not None:
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if not _broadcasts(tuple(mask.shape), full):
            raise ShapeError(f"blade::flash_attention: mask of shape {tuple(mask.shape)} does not broadcast "
                             f"to [batch, heads, q_seq, k_seq] = {list(full)}") from None
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise ShapeError(f"blade::flash_attention: mask must be bool or floating point, got {mask.dtype}")


def _broadcasts(shape: tuple, full: tuple) -> bool:
    """Whether `shape` broadcasts to `full` without growing it (plain ints are compared directly: the kernels call
    this on every run, and torch.broadcast_shapes costs tens of microseconds)."""
    if not all(type(d) is int for d in shape + full):
        try:
            return torch.broadcast_shapes(shape, full) == torch.Size(full)
        except RuntimeError:
            return False
    return len(shape) <= len(full) and all(m in (1, f) for m, f in zip(reversed(shape), reversed(full)))


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                        scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    """The op's meaning, through torch's scaled_dot_product_attention."""
    check_attention_args(q, k, v, mask)
    if mask is not None:  # SDPA refuses 0-D and 1-D masks, which the spec allows (broadcastable): [Sk] is [1, Sk]
        mask = torch.atleast_2d(mask)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    if causal and mask is not None:
        allowed = causal_allowed(q.shape[2], k.shape[2], q.device)
        mask = mask & allowed if mask.dtype == torch.bool else mask.masked_fill(~allowed, float("-inf"))
        causal = False
    elif causal and q.shape[2] != k.shape[2]:
        mask, causal = causal_allowed(q.shape[2], k.shape[2], q.device), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def causal_allowed(q_len: int, k_len: int, device) -> torch.Tensor:
    """[q_len, k_len] bool: True where key j <= query i (top-left aligned)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()


@torch.library.custom_op("blade::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    return in_output_layout(attention_reference(q, k, v, mask, scale, causal))


@flash_attention.register_fake
def _flash_attention_fake(q, k, v, mask=None, scale=None, causal=False):
    return empty_output(q, v)


def empty_output(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An uninitialized op output: shape [B, Hq, Sq, Dv], memory [B, Sq, Hq, Dv]."""
    batch, heads, q_len, _ = q.shape
    return q.new_empty((batch, q_len, heads, v.shape[-1])).transpose(1, 2)


def in_output_layout(out: torch.Tensor) -> torch.Tensor:
    """out itself when its memory is [B, Sq, Hq, Dv] already, else a copy laid out that way."""
    if out.transpose(1, 2).is_contiguous():
        return out
    return out.transpose(1, 2).contiguous().transpose(1, 2)


FLASH_ATTENTION = torch.ops.blade.flash_attention.default
