"""Global pooling: an average pool whose one window covers the whole input becomes a mean over its spatial dims.

Matches: `aten.avg_pool1d/2d/3d(x, kernel, stride, padding=0, ceil_mode, count_include_pad, divisor_override=None)`
whose output is 1 along every pooled dim and whose kernel is at least the input's (static) size along each —
Hugging Face EfficientNet's `AvgPool2d(1280, ceil_mode=True)` over a 7×7 map. Produces:
`aten.mean.dim(x, pooled dims, keepdim=True)`: the same numbers (with no padding the divisor is the input's size
whether or not padding counts), and an op every backend runs as a reduction. Inductor otherwise generates a loop over
the whole window (1280 × 1280 positions for 49 values) and took about 275 ms a call on EfficientNet-B0 at batch 1,
2 cores: 95 % of the network's time (an ad hoc profile, 2026-12-07).

Leaves alone: padding (the divisor depends on it), a divisor override, more than one window, and symbolic spatial
sizes (the window might not cover the next call's input).
"""
from __future__ import annotations

import torch

from blade.ir.graph import Graph, Node, TensorMeta
from blade.passes.manager import PassContext

aten = torch.ops.aten
POOLS = {aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}
POOL_ARGS = ("self", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _pooled_dims(node: Node) -> tuple[Node, list[int]] | None:
    """(the pooled tensor, the dims a whole-input average pool reduces, negative), or None when the pool is not one."""
    rank = POOLS[node.target]
    bound = dict(zip(POOL_ARGS, node.args))
    bound.update(node.kwargs)
    x, out = bound.get("self"), node.meta.get("val")
    if not isinstance(x, Node) or not isinstance(out, TensorMeta) or bound.get("divisor_override") is not None:
        return None
    padding = bound.get("padding", 0)
    if any(p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding])):
        return None
    kernel = list(bound["kernel_size"]) if isinstance(bound["kernel_size"], (list, tuple)) else [bound["kernel_size"]]
    kernel = kernel * rank if len(kernel) == 1 else kernel
    sizes = list(x.val.shape[-rank:])
    if not all(isinstance(s, int) for s in sizes) or any(o != 1 for o in out.shape[-rank:]):
        return None
    if any(k < s for k, s in zip(kernel, sizes)):
        return None
    return x, list(range(-rank, 0))


def run(graph: Graph, ctx: PassContext) -> Graph:
    for node in list(graph.call_nodes):
        if node.target not in POOLS:
            continue
        found = _pooled_dims(node)
        if found is None or not ctx.allows(node.name):
            continue
        x, dims = found
        mean = graph.add_node(aten.mean.dim, (x, dims, True), {}, meta=dict(node.meta), name=node.name)
        graph.replace_all_uses(node, mean)
        graph.remove_node(node)
        ctx.count("global_average_pools")
    return graph
