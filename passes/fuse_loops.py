"""Loop and reduction fusion: chains of elementwise ops and row reductions into fused regions.

The last of the three fusion passes (after passes/fuse_norms.py and passes/fuse_epilogues.py,
which take the named norm and matmul shapes first). Matches every chain of elementwise ops and row
reductions (softmax, layer norm, mean/sum/max over the last axis, var_mean) in which each producer
is read only by the next op. Produces one region per chain — kind "reduction" when it holds a
reduction (pattern: the reduction's name, e.g. "softmax"; a mean/var layer norm written by hand is
one such region), else "loop". Elementwise producers fuse into a reduction (its prologue) and
elementwise consumers of a reduction into it (its epilogue). The record counts each region as
`kind:pattern`, plus `regions` and `ops_in_regions`.

Legality: a region never creates a cycle (checked with the graph's reachability), never computes
a value twice (a producer read by two nodes stays outside), and runs exactly the ops it replaces,
so results differ from the unfused graph only by a backend's rounding.

Leaves alone: views, copies and data movement, matmuls without an epilogue, attention (its own
op), reductions over other axes, nodes that produce a tuple or a number.
"""
from __future__ import annotations

import torch

from blade.ir.fused import fusable, is_fused, topological
from blade.ir.graph import Graph, Node, TensorMeta
from blade.ops import info
from blade.ops.info import arg
from blade.passes.fuse_norms import only_user
from blade.passes.manager import PassContext
from blade.passes.rewrite import Plan, Region

aten = torch.ops.aten
ROW_REDUCTIONS = {
    aten.softmax.int: "softmax", aten._softmax.default: "softmax", aten._safe_softmax.default: "softmax",
    aten.log_softmax.int: "log_softmax", aten._log_softmax.default: "log_softmax",
    aten.layer_norm.default: "layer_norm", aten.mean.dim: "mean", aten.sum.dim_IntList: "sum",
    aten.amax.default: "amax", aten.var_mean.correction: "var_mean", aten.var.correction: "var",
    aten.var.dim: "var",
}


def _last_axis_only(node: Node) -> bool:
    """A reduction over just the last axis of its input."""
    x = node.args[0]
    if not isinstance(x, Node) or not isinstance(x.val, TensorMeta) or x.val.rank == 0:
        return False
    last = x.val.rank - 1
    if ROW_REDUCTIONS[node.target] in ("softmax", "log_softmax"):
        return arg(node, "dim") in (-1, last)
    if node.target == aten.layer_norm.default:
        return len(arg(node, "normalized_shape")) == 1
    dims = arg(node, "dim")
    return dims is not None and list(dims) in ([-1], [last])


def fusible(node: Node) -> bool:
    """Whether the node may join a loop/reduction region."""
    if node.op != "call" or is_fused(node) or not isinstance(node.val, TensorMeta):
        return False
    if node.target in info.ELEMENTWISE:
        return True
    if node.target in info.CASTS:
        return set(node.kwargs) <= {"dtype"}
    return node.target in ROW_REDUCTIONS and _last_axis_only(node)


def clusters(graph: Graph) -> list[list[Node]]:
    """Groups of fusible nodes joined by single-reader producer→consumer edges (union-find)."""
    parent: dict[Node, Node] = {}

    def find(n: Node) -> Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    nodes = [n for n in graph.call_nodes if fusible(n)]
    for n in nodes:
        parent[n] = n
    for n in nodes:
        reader = only_user(graph, n)
        if reader is not None and reader in parent:
            parent[find(n)] = find(reader)
    groups: dict[Node, list[Node]] = {}
    for n in nodes:
        groups.setdefault(find(n), []).append(n)
    return [topological(graph, g) for g in groups.values() if len(g) > 1]


def _pattern(members: list[Node]) -> tuple[str, str]:
    reductions = [ROW_REDUCTIONS[m.target] for m in members if m.target in ROW_REDUCTIONS]
    if not reductions:
        return "loop", "loop"
    return "reduction", "_".join(sorted(set(reductions)))


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Fuse every chain of fusible nodes that can become one region."""
    for members in clusters(graph):
        why = fusable(graph, members)
        if why:
            ctx.note(f"not fused {[m.name for m in members]}: {why}")
            continue
        kind, pattern = _pattern(members)
        if ctx.allows(members[-1].name):
            Plan(members[-1].name, region=Region(members, kind, pattern)).commit(graph)
            ctx.count(f"{kind}:{pattern}")
            ctx.count("regions")
            ctx.count("ops_in_regions", len(members))
    return graph
