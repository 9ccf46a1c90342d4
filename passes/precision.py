"""Mixed precision: matmuls, convolutions and attention compute in fp16/bf16; everything else stays fp32.

Matches (config.precision "fp16" or "bf16"): `linear`, `matmul`, `mm`, `bmm`, `addmm`, `baddbmm`,
`conv1d/2d/3d`, `convolution` and `blade::flash_attention` nodes on fp32 tensors. Produces: the same
node computing in the low dtype — its constant operands (weights, biases) cast once, at compile
time (a weight read by several nodes is cast once); its other operands through one
`_to_copy(dtype=low)` per value; its result cast back to fp32 right after. Matmuls accumulate in
fp32 inside the kernels (PyTorch's, ONNX Runtime's, Triton's); norms, softmax and their statistics,
residual additions and the model's outputs stay fp32, which is what keeps the error near 1e-3.
A cast of a cast back (fp16 → fp32 → fp16, exact) is dropped, also through shape-only ops (views,
transposes, splits), which are rebuilt on the low value: two low-precision nodes in a row — a fused
QKV projection and attention, attention and the output projection — pass their value directly.

With config.keep_output_dtype False, the model's fp32 outputs are returned in the low dtype, as
`model.to(dtype)` would return them (ONNX Runtime's keep_io_types=False): an output that is a low
node's cast back (through shape-only views) reads the low value directly, any other gets one cast.
That saves the cast back and half the bytes of each output (GPT's logits are the largest tensor).

Leaves alone: nodes named in config.keep_high_precision, nodes already in another dtype, every
other op, and precision "fp32" (or None).
"""
from __future__ import annotations

import operator

import torch

from blade.errors import ConfigError
from blade.ir.graph import Graph, Node, TensorMeta, map_refs
from blade.ops.attention import FLASH_ATTENTION
from blade.passes.cleanup import eliminate_dead_code
from blade.passes.manager import PassContext

aten = torch.ops.aten
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOW_PRECISION_OPS = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default,
                     aten.baddbmm.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                     aten.convolution.default, FLASH_ATTENTION}
CAST = aten._to_copy.default
# ops that only rearrange their first argument: an output reached through them can be rebuilt on the low value
SHAPE_ONLY_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
                  aten.transpose.int, aten.t.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
                  aten.expand.default, aten.alias.default}
SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default}


def low_dtype(precision: str | None) -> torch.dtype | None:
    """The dtype for `precision` (None for fp32), or ConfigError naming the choices."""
    if precision is None:
        return None
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {list(PRECISIONS)}")
    return None if precision == "fp32" else PRECISIONS[precision]


def is_cast(node: Node) -> bool:
    return node.op == "call" and node.target == CAST and set(node.kwargs) == {"dtype"} and len(node.args) == 1


def _eligible(node: Node, keep: set[str]) -> bool:
    if node.target not in LOW_PRECISION_OPS or node.name in keep or not isinstance(node.val, TensorMeta):
        return False
    tensors = [r for r in node.refs() if isinstance(r.val, TensorMeta)]
    return node.val.dtype == torch.float32 and all(
        r.val.dtype == torch.float32 or not r.val.dtype.is_floating_point for r in tensors)


def run(graph: Graph, ctx: PassContext) -> Graph:
    low = low_dtype(ctx.config.precision)
    if low is None:
        return graph
    keep = set(ctx.config.keep_high_precision)
    casts: dict[Node, Node] = {}
    rebuilt: dict[Node, Node | None] = {}

    def lowered(ref: Node) -> Node:
        if not (isinstance(ref.val, TensorMeta) and ref.val.dtype == torch.float32):
            return ref
        if ref not in casts:
            if ref.op == "constant":
                tensor = graph.constants[ref.name].to(low)
                casts[ref] = graph.add_constant(f"{ref.name}_{_short(low)}", tensor, f"{ref.target} ({_short(low)})")
            else:
                casts[ref] = _in_low(graph, ref, low, rebuilt) or graph.add_node(
                    CAST, (ref,), {"dtype": low}, {"val": TensorMeta(ref.val.shape, low, ref.val.device)},
                    name=f"{ref.name}_{_short(low)}")
        return casts[ref]

    for node in graph.call_nodes:
        if not _eligible(node, keep) or not ctx.allows(node.name):
            continue
        graph.set_args(node, map_refs(node.args, lowered), map_refs(node.kwargs, lowered))
        node.meta = dict(node.meta, val=TensorMeta(node.val.shape, low, node.val.device), precision=_short(low),
                         layer=node.name)
        back = graph.add_node(CAST, (node,), {"dtype": torch.float32},
                              {"val": TensorMeta(node.val.shape, torch.float32, node.val.device)},
                              name=f"{node.name}_f32")
        graph.replace_all_uses(node, back)
        ctx.count(f"{_short(low)}_{_op_name(node)}")
    if not ctx.config.keep_output_dtype:
        _lower_outputs(graph, low, rebuilt, casts, ctx)
    eliminate_dead_code(graph, ctx)
    return graph


run.top_level_only = True  # calibration and the accuracy guard see the whole model; nested graphs stay fp32


def _low_meta(val, low: torch.dtype):
    """`val` (a TensorMeta or a tuple of them, all fp32) in `low`; None when anything in it is not fp32."""
    if isinstance(val, TensorMeta):
        return TensorMeta(val.shape, low, val.device) if val.dtype == torch.float32 else None
    if isinstance(val, (tuple, list)) and val:
        parts = [_low_meta(v, low) for v in val]
        return None if any(p is None for p in parts) else type(val)(parts)
    return None


def _in_low(graph: Graph, node: Node, low: torch.dtype, memo: dict) -> Node | None:
    """`node`'s value in `low` without a cast, where it is a low node's cast back seen through shape-only ops
    (views, splits): the chain rebuilt on the low value (exact: bf16 -> fp32 -> bf16 is the identity); else None."""
    if node in memo:
        return memo[node]
    found = None
    if is_cast(node) and isinstance(node.args[0], Node) and isinstance(node.args[0].val, TensorMeta) \
            and node.args[0].val.dtype == low:
        found = node.args[0]
    elif _rearranges(node):
        meta = _low_meta(node.val, low)
        inner = _in_low(graph, node.args[0], low, memo) if meta is not None else None
        if inner is not None:
            found = graph.add_node(node.target, (inner, *node.args[1:]), node.kwargs, dict(node.meta, val=meta),
                                   name=f"{node.name}_{_short(low)}")
    memo[node] = found
    return found


def _lower_outputs(graph: Graph, low: torch.dtype, memo: dict, casts: dict, ctx: PassContext) -> None:
    """Point every fp32 output at its value in `low`: the low node under a cast back, else a cast (the one a
    low-precision reader already has, or a new one). Never an input or a constant itself: the caller's own
    tensor must not come back as an output."""
    for i, out in enumerate(graph.outputs):
        if not (isinstance(out, Node) and isinstance(out.val, TensorMeta) and out.val.dtype == torch.float32):
            continue
        lowered = _in_low(graph, out, low, memo)
        if lowered is not None and _viewed(lowered).op != "call":
            lowered = None
        if lowered is None and out in casts and _viewed(casts[out]).op == "call":
            lowered = casts[out]
        if lowered is None:
            lowered = graph.add_node(CAST, (out,), {"dtype": low}, {"val": TensorMeta(out.val.shape, low, out.val.device)},
                                     name=f"{out.name}_out_{_short(low)}")
            ctx.count("output_casts")
        else:
            ctx.count("outputs_read_low")
        graph.outputs[i] = lowered


def _rearranges(node: Node) -> bool:
    """Whether `node` only rearranges its first argument: a shape-only op, a split, or an item of a split."""
    if node.op != "call" or not node.args or not isinstance(node.args[0], Node):
        return False
    return node.target in SHAPE_ONLY_OPS or node.target in SPLIT_OPS or (
        node.target is operator.getitem and node.args[0].target in SPLIT_OPS)


def _viewed(node: Node) -> Node:
    """The node whose memory `node` views, through shape-only ops and splits (itself when it computes)."""
    while _rearranges(node):
        node = node.args[0]
    return node


def _short(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _op_name(node: Node) -> str:
    return node.target._schema.name.split("::")[-1]
