"""Cleanup: remove no-ops (identity views, copies and casts, eval-mode dropout), merge common
subexpressions, and drop dead code.

Matches: runtime metadata asserts that the IR's meta already proves; the no-op rules in NOOP_RULES (each checks that output and input have the same shape,
dtype and device before it fires); pure call nodes with the same target and arguments (CSE);
call nodes and constants that no output reads (DCE). Leaves alone: graph inputs (the calling
convention), side-effecting ops (runtime asserts), random ops, and a copy whose removal would make
an output alias a graph input or a weight.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx

from blade.ir import Graph, Node, TensorMeta, format_target
from blade.passes.manager import PassContext
from blade.shapes import same_shape

aten = torch.ops.aten


def _source(node: Node) -> Node | None:
    """The input a no-op candidate would forward, if it is a tensor node."""
    src = node.args[0] if node.args else None
    return src if isinstance(src, Node) else None


def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _always(node: Node) -> bool:
    return True


def _eval_dropout(node: Node) -> bool:
    return _arg(node, 2, "train") is False or _arg(node, 1, "p") == 0


def _plain_clone(node: Node) -> bool:
    return node.kwargs.get("memory_format") in (None, torch.preserve_format)


def _no_layout_change(node: Node) -> bool:
    return node.kwargs.get("memory_format") in (None, torch.preserve_format)


def _is_literal(value) -> Callable[[Node], bool]:
    def check(node: Node) -> bool:
        other = _arg(node, 1, "other")
        return not isinstance(other, Node) and other == value and not isinstance(other, bool)
    return check


def _identity_permutation(node: Node) -> bool:
    dims = _arg(node, 1, "dims")
    return list(dims) == list(range(len(dims)))


def _same_axes(node: Node) -> bool:
    rank = len(node.shape)
    return _arg(node, 1, "dim0") % max(rank, 1) == _arg(node, 2, "dim1") % max(rank, 1)


def _unit_step(node: Node) -> bool:
    return _arg(node, 4, "step", 1) == 1


# target -> extra condition; every rule also requires the output meta to equal the input's.
NOOP_RULES: dict[object, Callable[[Node], bool]] = {
    aten.clone.default: _plain_clone,
    aten.alias.default: _always,
    aten.detach.default: _always,
    aten.lift_fresh_copy.default: _always,
    aten.dropout.default: _eval_dropout,
    aten._to_copy.default: _no_layout_change,
    aten.to.dtype: _no_layout_change,
    aten.to.dtype_layout: _no_layout_change,
    aten.to.device: _no_layout_change,
    aten.type_as.default: _always,
    aten.view.default: _always,
    aten.reshape.default: _always,
    aten._unsafe_view.default: _always,
    aten.expand.default: _always,
    aten.squeeze.dim: _always,
    aten.squeeze.dims: _always,
    aten.flatten.using_ints: _always,
    aten.permute.default: _identity_permutation,
    aten.transpose.int: _same_axes,
    aten.slice.Tensor: _unit_step,
    aten.mul.Tensor: _is_literal(1),
    aten.mul.Scalar: _is_literal(1),
    aten.div.Tensor: _is_literal(1),
    aten.div.Scalar: _is_literal(1),
    aten.add.Tensor: _is_literal(0),
    aten.add.Scalar: _is_literal(0),
    aten.sub.Tensor: _is_literal(0),
    aten.sub.Scalar: _is_literal(0),
}


def _same_meta(a, b) -> bool:
    return (isinstance(a, TensorMeta) and isinstance(b, TensorMeta) and a.dtype == b.dtype
            and a.device == b.device and same_shape(a.shape, b.shape))


def _is_impure(target) -> bool:
    side_effects = getattr(torch.fx.node, "_side_effectful_functions", set())
    if target in side_effects:
        return True
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _is_random(target) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())


def remove_noops(graph: Graph, ctx: PassContext) -> None:
    for node in graph.call_nodes:
        rule = NOOP_RULES.get(node.target)
        src = _source(node)
        if rule is None or src is None or not _same_meta(node.val, src.val) or not rule(node):
            continue
        if src.op in ("input", "constant") and graph.is_output(node):
            continue  # the output would alias the user's input or a weight
        graph.replace_all_uses(node, src)
        graph.remove_node(node)
        ctx.count(f"noop:{format_target(node.target)}")


def _assert_holds(node: Node) -> bool:
    """An _assert_tensor_metadata whose dtype/device/size claims the input's meta already proves."""
    src = _source(node)
    meta = src.val if src is not None else None
    if not isinstance(meta, TensorMeta):
        return False
    dtype, size = _arg(node, 3, "dtype"), _arg(node, 1, "size")
    device = node.kwargs.get("device")
    return ((dtype is None or dtype == meta.dtype)
            and (device is None or torch.device(device).type == meta.device)
            and (size is None or (not any(isinstance(s, Node) for s in size) and same_shape(tuple(size), meta.shape)))
            and _arg(node, 2, "stride") is None)


def remove_proven_asserts(graph: Graph, ctx: PassContext) -> None:
    for node in graph.call_nodes:
        if node.target == aten._assert_tensor_metadata.default and _assert_holds(node):
            graph.remove_node(node)
            ctx.count("asserts_proven")


def _freeze(value):
    """A hashable key for an argument nest (nodes by identity)."""
    if isinstance(value, Node):
        return ("node", id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, float) and value != value:
        return ("nan",)
    return (type(value).__name__, value)


def eliminate_common_subexpressions(graph: Graph, ctx: PassContext) -> None:
    seen: dict = {}
    for node in graph.call_nodes:
        if _is_impure(node.target) or _is_random(node.target):
            continue
        key = (node.target, _freeze(node.args), _freeze(node.kwargs))
        first = seen.setdefault(key, node)
        if first is not node:
            graph.replace_all_uses(node, first)
            graph.remove_node(node)
            ctx.count("cse_merged")


def eliminate_dead_code(graph: Graph, ctx: PassContext) -> None:
    roots = graph.output_nodes + [n for n in graph.call_nodes if _is_impure(n.target)]
    live, stack = set(roots), list(roots)
    while stack:
        for pred in graph.nx.predecessors(stack.pop()):
            if pred not in live:
                live.add(pred)
                stack.append(pred)
    for node in reversed(graph.nodes):
        if node not in live and node.op != "input":
            graph.remove_node(node)
            ctx.count("dead_constants" if node.op == "constant" else "dead_nodes")


def run(graph: Graph, ctx: PassContext) -> Graph:
    remove_proven_asserts(graph, ctx)
    remove_noops(graph, ctx)
    eliminate_common_subexpressions(graph, ctx)
    eliminate_dead_code(graph, ctx)
    return graph
