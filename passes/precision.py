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
from blade.ir.graph import Graph, Node, TensorMeta, dtype_name, dtype_named, map_refs
from blade.ops.attention import FLASH_ATTENTION
from blade.ops.info import CONVOLUTIONS, MATMULS, REARRANGES, SPLITS, infer_meta
from blade.passes.cleanup import eliminate_dead_code
from blade.passes.manager import PassContext

aten = torch.ops.aten
PRECISIONS = ("fp32", "fp16", "bf16")
LOW_PRECISION_OPS = MATMULS | CONVOLUTIONS | {FLASH_ATTENTION}
CAST = aten._to_copy.default


def low_dtype(precision: str | None) -> torch.dtype | None:
    """The dtype for `precision` (None for fp32), or ConfigError naming the choices."""
    if precision is None:
        return None
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {list(PRECISIONS)}")
    return None if precision == "fp32" else dtype_named(precision)


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
                casts[ref] = graph.add_constant(f"{ref.name}_{dtype_name(low)}", tensor, f"{ref.target} ({dtype_name(low)})")
            else:
                casts[ref] = _in_low(graph, ref, low, rebuilt) or _cast(graph, ref, low, f"{ref.name}_{dtype_name(low)}")
        return casts[ref]

    for node in graph.call_nodes:
        if not _eligible(node, keep) or not ctx.allows(node.name):
            continue
        graph.set_args(node, map_refs(node.args, lowered), map_refs(node.kwargs, lowered))
        node.meta = dict(node.meta, val=infer_meta(node.target, node.args, node.kwargs), precision=dtype_name(low),
                         layer=node.name)
        back = _cast(graph, node, torch.float32, f"{node.name}_{dtype_name(torch.float32)}")
        graph.replace_all_uses(node, back)
        ctx.count(f"{dtype_name(low)}_{_op_name(node)}")
    if not ctx.config.keep_output_dtype:
        _lower_outputs(graph, low, rebuilt, casts, ctx)
    eliminate_dead_code(graph, ctx)
    return graph


run.top_level_only = True  # calibration and the accuracy guard see the whole model; nested graphs stay fp32


def _cast(graph: Graph, node: Node, dtype: torch.dtype, name: str) -> Node:
    return graph.add_node(CAST, (node,), {"dtype": dtype}, {"val": infer_meta(CAST, (node,), {"dtype": dtype})},
                          name=name)


def _all_fp32(val) -> bool:
    """Whether `val` is an fp32 TensorMeta or a non-empty tuple of them."""
    if isinstance(val, TensorMeta):
        return val.dtype == torch.float32
    return isinstance(val, (tuple, list)) and bool(val) and all(_all_fp32(v) for v in val)


def _in_low(graph: Graph, node: Node, low: torch.dtype, memo: dict) -> Node | None:
    """`node`'s value in `low` without a cast, where it is a low node's cast back seen through shape-only ops
    (views, splits): the chain rebuilt on the low value (exact: bf16 -> fp32 -> bf16 is the identity); else None."""
    if node in memo:
        return memo[node]
    found = None
    if is_cast(node) and isinstance(node.args[0], Node) and isinstance(node.args[0].val, TensorMeta) \
            and node.args[0].val.dtype == low:
        found = node.args[0]
    elif _rearranges(node) and _all_fp32(node.val):
        inner = _in_low(graph, node.args[0], low, memo)
        if inner is not None:
            args = (inner, *node.args[1:])
            found = graph.add_node(node.target, args, node.kwargs,
                                   dict(node.meta, val=infer_meta(node.target, args, node.kwargs)),
                                   name=f"{node.name}_{dtype_name(low)}")
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
            lowered = _cast(graph, out, low, f"{out.name}_out_{dtype_name(low)}")
            ctx.count("output_casts")
        else:
            ctx.count("outputs_read_low")
        graph.outputs[i] = lowered


def _rearranges(node: Node) -> bool:
    """Whether `node` only rearranges its first argument: a shape-only op, a split, or an item of a split."""
    if node.op != "call" or not node.args or not isinstance(node.args[0], Node):
        return False
    return node.target in REARRANGES or node.target in SPLITS or (
        node.target is operator.getitem and node.args[0].target in SPLITS)


def _viewed(node: Node) -> Node:
    """The node whose memory `node` views, through shape-only ops and splits (itself when it computes)."""
    while _rearranges(node):
        node = node.args[0]
    return node


def _op_name(node: Node) -> str:
    return node.target._schema.name.split("::")[-1]
