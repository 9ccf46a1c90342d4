"""blade::flash_attention over few keys, for Inductor on CPU in bf16: plain ops it fuses, not the Python kernel.

Only for the calls blade's fused native kernel (backends/kernels/attention_native.py) does not take, decided per node
when the graph is handed to Inductor (InductorExecutable): no AVX512-BF16, AMX, or no C++ compiler here, an odd
head dim. blade's other bf16 CPU kernel (backends/kernels/attention_blocked.py) is a
Python op of about 25 PyTorch calls per layer. Over at most SHORT_KEYS keys it computes a single block, and that
overhead is a large part of the call; written as plain ops instead — a bf16 GEMM for the scores, one fused
Inductor kernel for scale, mask, causal triangle and the fp32 softmax, a bf16 GEMM for the output — it leaves
nothing to run in Python.
Only where the kernel registry (backends/kernels/registry.py) picks the CPU kernel: a kernel of one's own set with
registry.override("flash_attention", "cpu", ...) keeps every call (InductorExecutable asks when it compiles).
More keys keep the op (the blocked kernel reads under `causal` only the keys each block needs and never
holds Sq × Sk scores). The length is checked when dynamo traces: a graph compiled for one side of
SHORT_KEYS compiles once more on the first call from the other side (a guard on the symbolic length).

Same meaning as the op (blade/ops/attention.py): top-left causal, bool or additive masks broadcast to
[B, Hq, Sq, Sk], grouped-query heads read their shared key/value head without a copy, rows with no key
left give zeros (decided from the mask and the triangle alone, as the blocked kernel does), output memory
[B, Sq, Hq, Dv]. The mask is added to the scores in fp32, so BERT's -10000 does not round them away. Each
symbolic key length is guarded on its own: a graph with several (an encoder-decoder's source and target)
compiles once per combination of sides met, which dynamo's recompile limit (8 by default) bounds; past it
dynamo runs the graph uncompiled.
"""
from __future__ import annotations

from typing import Optional

import torch

from blade.ops.attention import FLASH_ATTENTION, causal_allowed

# The blocked kernel's single block. At 128 keys this took zoo bert base in bf16 from parity with torch.compile of
# the bf16-cast model to ahead of it (bench/results/bf16_cpu.md); the same ops in two causal blocks of 128 queries
# (up to 256 keys) left gpt base at seq 256 where the blocked kernel has it (an ad hoc run, not kept).
SHORT_KEYS = 128


def attention_for_inductor(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                           scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    """blade::flash_attention as Inductor compiles it: plain ops for bf16 CPU attention over 1 to SHORT_KEYS keys,
    the op otherwise."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and 0 < k.shape[2] <= SHORT_KEYS:
        return short_attention(q, k, v, mask, scale, causal)
    return FLASH_ATTENTION(q, k, v, mask, scale, causal=causal)


def short_attention(q, k, v, mask=None, scale=None, causal=False) -> torch.Tensor:
    """The op's meaning as plain ops: bf16 score and output GEMMs, scale/mask/softmax in fp32 between them."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = q_heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    rows = q.reshape(batch, kv_heads, group * q_len, head_dim)  # the group's queries against their key head
    scores = torch.matmul(rows, k.transpose(-1, -2)).view(batch, q_heads, q_len, k_len).float() * scale
    bias = _bias(mask, causal, q_len, k_len, q.device)
    dead = None
    if bias is not None:
        scores = scores + bias
        dead = bias.amax(dim=-1, keepdim=True) == float("-inf")  # rows the mask leaves no key (as the op: zeros)
    probs = torch.softmax(scores, dim=-1)
    if dead is not None:
        probs = probs.masked_fill(dead, 0.0)
    out = torch.matmul(probs.to(q.dtype).view(batch, kv_heads, group * q_len, k_len), v)
    out = out.view(batch, q_heads, q_len, v_dim)
    if dead is not None:  # also where a masked key's value is NaN or inf (0 · inf)
        out = out.masked_fill(dead, 0.0)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _bias(mask, causal: bool, q_len, k_len, device) -> Optional[torch.Tensor]:
    """The mask and the causal triangle as one additive fp32 bias (0 or -inf for bool masks and the triangle),
    broadcastable to the scores; None without either."""
    bias = None
    if mask is not None:
        mask = torch.atleast_2d(mask)
        bias = (torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                else mask.float())
    if causal:
        triangle = torch.zeros(q_len, k_len, device=device).masked_fill(~causal_allowed(q_len, k_len, device),
                                                                         float("-inf"))
        bias = triangle if bias is None else bias + triangle
    return bias
