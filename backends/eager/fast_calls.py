"""The torch functions that run the aten ops a decode step makes most often, for the eager backend's fx module.

fx code calls each op as an OpOverload (`torch.ops.aten.reshape.default(...)`), whose Python layer costs 1-2 µs a
call on top of the op; a GPT-2 decode step makes ~300 calls of these small ops (views, adds, layer norms; Llama's
RMSNorm, RoPE and SwiGLU add powers, splits and SiLUs), about 4 % of the step on the 2-core CPU
(bench/results/llm_decode_breakdown.md). The functions below bind the same aten
ops through torch's own argument parser (torch._C._VariableFunctions or a Tensor method) and take the arguments
as fx passes them: positional as in the schema, keyword-only ones by name. tests/backends/test_fast_calls.py runs
each against its OpOverload (values, strides, aliasing). index_put_ is not here: its function refuses the None
entries of an index list that the op takes.
"""
from __future__ import annotations

import torch

aten = torch.ops.aten
_VF = torch._C._VariableFunctions

FAST_CALLS = {
    aten.reshape.default: _VF.reshape,
    aten.view.default: torch.Tensor.view,
    aten.transpose.int: _VF.transpose,
    aten.permute.default: _VF.permute,
    aten.unsqueeze.default: _VF.unsqueeze,
    aten.squeeze.dim: _VF.squeeze,
    aten.select.int: _VF.select,
    aten.split.Tensor: _VF.split,
    aten.add.Tensor: _VF.add,
    aten.sub.Tensor: _VF.sub,
    aten.mul.Tensor: _VF.mul,
    aten.div.Tensor: _VF.div,
    aten.neg.default: _VF.neg,
    aten.clone.default: _VF.clone,
    aten.cat.default: _VF.cat,
    aten.layer_norm.default: _VF.layer_norm,
    aten.embedding.default: _VF.embedding,
    aten.index_copy_.default: torch.Tensor.index_copy_,
    aten.softmax.int: _VF.softmax,
    aten.relu.default: _VF.relu,
    aten.tanh.default: _VF.tanh,
    aten.sigmoid.default: _VF.sigmoid,
    aten.rsqrt.default: _VF.rsqrt,
    aten.mean.dim: _VF.mean,
    aten.bmm.default: _VF.bmm,
    aten.mm.default: _VF.mm,
    aten.addmm.default: _VF.addmm,
    aten.matmul.default: _VF.matmul,
    aten.pow.Tensor_Scalar: _VF.pow,
    aten.split_with_sizes.default: _VF.split_with_sizes,
    aten.expand.default: torch.Tensor.expand,
    aten.silu.default: torch._C._nn.silu,
    aten.gelu.default: torch._C._nn.gelu,
}

