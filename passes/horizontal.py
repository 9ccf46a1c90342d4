"""Horizontal fusion: independent linear layers that read the same input become one wider matmul.

Matches: two or more `aten.linear(x, W_i, b_i)` on the same x whose weights are constants with
the same input features, dtype and device, and whose biases are all constants or all absent —
the Q/K/V projections of attention, the gate/up projections of a gated MLP. Produces: one
`linear(x, cat(W_i), cat(b_i))` (the concatenation done now, on the weights) and one
`split_with_sizes` along the last axis, each former linear replaced by its part. The parts are
views into the wide output, so each `view` downstream of them becomes a `reshape` (a view where
the layout allows, a copy where it does not).

Leaves alone: linears on different inputs, weights that are not constants (computed per call),
mixed bias/no-bias groups, single linears.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch

from blade.ir.graph import Graph, Node
from blade.ops.info import VIEW_RESHAPES, infer_meta, is_view
from blade.passes.cleanup import eliminate_dead_code
from blade.passes.manager import PassContext

aten = torch.ops.aten


def _weights(graph: Graph, node: Node) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(W, b) of a linear whose weight and bias are constants, else None."""
    if node.target != aten.linear.default or node.kwargs:
        return None
    weight = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if not (isinstance(weight, Node) and weight.op == "constant"):
        return None
    if bias is not None and not (isinstance(bias, Node) and bias.op == "constant"):
        return None
    return graph.constants[weight.name], None if bias is None else graph.constants[bias.name]


def _groups(graph: Graph) -> list[list[Node]]:
    by_input: dict[tuple, list[Node]] = defaultdict(list)
    for node in graph.call_nodes:
        wb = _weights(graph, node) if node.args and isinstance(node.args[0], Node) else None
        if wb is None:
            continue
        weight, bias = wb
        key = (node.args[0], weight.shape[1], weight.dtype, weight.device, bias is None)
        by_input[key].append(node)
    return [group for group in by_input.values() if len(group) > 1]


def _aliases(node: Node) -> bool:
    """An op whose output shares memory with its first argument (reshape: sometimes), or a getitem."""
    return is_view(node.target) or node.target in (aten.reshape.default, operator.getitem)


def _reshape_downstream(graph: Graph, node: Node) -> int:
    """Every `view` reached from node through ops that alias it becomes a `reshape`; returns how many."""
    changed, stack = 0, [node]
    while stack:
        current = stack.pop()
        for user in graph.users(current):
            if _aliases(user) and user.args and user.args[0] is current:
                if user.target in VIEW_RESHAPES:
                    user.target = aten.reshape.default
                    changed += 1
                stack.append(user)
    return changed


def fuse_group(graph: Graph, group: list[Node]) -> None:
    x = group[0].args[0]
    parts = [_weights(graph, n) for n in group]
    weight = graph.add_constant(f"{group[0].name}_hfused_weight", torch.cat([w for w, _ in parts]).contiguous(),
                                "+".join(n.meta.get("source") or n.name for n in group) + " (weights concatenated)")
    bias = None
    if parts[0][1] is not None:
        bias = graph.add_constant(f"{group[0].name}_hfused_bias", torch.cat([b for _, b in parts]).contiguous(),
                                  "+".join(n.meta.get("source") or n.name for n in group) + " (biases concatenated)")
    sizes = [w.shape[0] for w, _ in parts]
    wide = graph.add_node(aten.linear.default, (x, weight, bias), {},
                          {"val": infer_meta(aten.linear.default, (x, weight, bias))}, name=f"{group[0].name}_wide")
    split = graph.add_node(aten.split_with_sizes.default, (wide, sizes, -1), {},
                           {"val": tuple(n.val for n in group)}, name=f"{group[0].name}_split")
    for i, node in enumerate(group):
        part = graph.add_node(operator.getitem, (split, i), {}, dict(node.meta), name=f"{node.name}_part")
        graph.replace_all_uses(node, part)
        graph.remove_node(node)
        _reshape_downstream(graph, part)


def run(graph: Graph, ctx: PassContext) -> Graph:
    for group in _groups(graph):
        if not ctx.allows(group[0].name):
            continue
        fuse_group(graph, group)
        ctx.count(f"linears_{len(group)}_into_1")
    eliminate_dead_code(graph, ctx)
    return graph
