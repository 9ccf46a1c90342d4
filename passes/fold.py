"""Constant folding: compute once, at compile time, every node whose inputs are all weights.

Matches: a pure, deterministic call whose tensor arguments are all constants (weights, buffers,
or nodes folded before it) and whose other arguments are literals — transposes, casts, reshapes
and slices of weights, buffer arithmetic, concatenations of weights. Produces: one new constant
holding the result (contiguous, detached), and the readers pointed at it.

Leaves alone: nodes that read a graph input or a size of one (they change per call); random and
side-effecting ops; a result more than FOLD_GROWTH times larger than what it reads, and larger
than FOLD_MIN_BYTES (an expand or a `ones(...)` would trade a cheap op for memory; noted with its
size); results that are not one tensor; a weight returned as an output (returned as it is).
"""
from __future__ import annotations

import torch

from blade.ir.graph import Graph, Node, TensorMeta, iter_refs, map_refs
from blade.ops.info import is_impure, is_random
from blade.passes.cleanup import eliminate_dead_code
from blade.passes.manager import PassContext

FOLD_GROWTH = 2
FOLD_MIN_BYTES = 1 << 20


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _foldable(node: Node, values: dict[Node, torch.Tensor]) -> bool:
    if is_impure(node.target) or is_random(node.target) or not isinstance(node.val, TensorMeta):
        return False
    refs = list(iter_refs((node.args, node.kwargs)))
    return bool(refs) and all(ref in values for ref in refs)


def run(graph: Graph, ctx: PassContext) -> Graph:
    values: dict[Node, torch.Tensor] = {n: graph.constants[n.name] for n in graph.constant_nodes}
    for node in graph.call_nodes:
        if not _foldable(node, values):
            continue
        args = map_refs(node.args, values.__getitem__)
        kwargs = map_refs(node.kwargs, values.__getitem__)
        with torch.no_grad():
            result = node.target(*args, **kwargs)
        if not isinstance(result, torch.Tensor):
            continue
        read = sum(_nbytes(values[ref]) for ref in node.refs())
        if _nbytes(result) > max(FOLD_GROWTH * read, FOLD_MIN_BYTES):
            ctx.note(f"not folded {node.name} ({node.target}): {_nbytes(result)} bytes from {read}")
            continue
        # a copy, always: a view of a weight kept beside the weight would share its memory
        values[node] = result.detach().clone(memory_format=torch.contiguous_format)
        if graph.is_output(node) or not ctx.allows(node.name):
            continue
        source = node.meta.get("source") or node.name
        constant = graph.add_constant(f"{node.name}_folded", values[node], f"{source} (folded)")
        values[constant] = values[node]
        graph.replace_all_uses(node, constant)
        ctx.count("folded")
    eliminate_dead_code(graph, ctx)
    return graph
