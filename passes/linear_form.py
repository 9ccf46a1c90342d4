"""Constant-weight matmuls as aten.linear over a [out, in] weight: addmm(b, x, W) and mm(x, W) with a constant W.

Hugging Face's GPT-2 family (Conv1D) and traced code reach a layer as addmm(bias, x, W[in, out]); quantization and
the eager backend's decode kernel read linear(x, Wᵀ[out, in], bias), one layer spelled one way. The transposed
weight is made once (a constant shared by every reader); the [in, out] original goes when nothing else reads it.
Leaves alone: addmm with beta or alpha other than 1 or a bias that is not 1-D [out], and computed weights.
"""
from __future__ import annotations

import torch

from blade.ir.graph import Graph, Node, TensorMeta
from blade.ops.info import arg
from blade.passes.cleanup import eliminate_dead_code
from blade.passes.manager import PassContext

aten = torch.ops.aten


def _weight(node: Node) -> Node | None:
    """The [in, out] constant weight of an addmm or mm this pass rewrites, else None."""
    if node.target == aten.addmm.default:
        if arg(node, "beta") != 1 or arg(node, "alpha") != 1:
            return None
        weight, bias = node.args[2], node.args[0]
        if not (isinstance(bias, Node) and isinstance(bias.val, TensorMeta) and len(bias.val.shape) == 1):
            return None
    elif node.target == aten.mm.default:
        weight = node.args[1]
    else:
        return None
    if isinstance(weight, Node) and weight.op == "constant" and len(weight.val.shape) == 2:
        return weight
    return None


def run(graph: Graph, ctx: PassContext) -> Graph:
    transposed: dict[Node, Node] = {}
    for node in list(graph.call_nodes):
        weight = _weight(node)
        if weight is None or not ctx.allows(node.name):
            continue
        if weight not in transposed:
            tensor = graph.constants[weight.name].t().contiguous()
            transposed[weight] = graph.add_constant(f"{weight.name}_t", tensor, f"{weight.target} (transposed)")
        x, bias = (node.args[1], node.args[0]) if node.target == aten.addmm.default else (node.args[0], None)
        new = graph.add_node(aten.linear.default, (x, transposed[weight], bias), {}, dict(node.meta),
                             name=f"{node.name}_linear")
        graph.replace_all_uses(node, new)
        graph.remove_node(node)
        ctx.count("linear")
    if transposed:
        eliminate_dead_code(graph, ctx)
    return graph
