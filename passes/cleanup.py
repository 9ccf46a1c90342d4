"""Cleanup: drop proven asserts and no-ops (identity views, copies and casts, eval-mode dropout),
merge common subexpressions, and remove dead code.

Matches: `_assert_tensor_metadata` whose claims the IR's meta already proves; the rules in
NOOP_RULES, each of which also needs the output's shape, dtype and device to equal the input's;
pure call nodes with the same target and arguments (CSE); nodes and constants no output reads (DCE).

Leaves alone: graph inputs (the calling convention); side-effecting and random ops; a copy whose
result reaches an output (the caller must not get an alias of an input, a weight or another
output); a copy of a view (it may be what makes the data dense for a later `view`); two nodes that
are both outputs (eager returns two tensors, so must we); arithmetic identities that would flip
the sign of a zero.
"""
from __future__ import annotations

import math
import operator
from typing import Callable

import torch
import torch.fx

from blade.ir.graph import Graph, Node, TensorMeta, format_target
from blade.ops.info import COPIES, RESHAPES, TO_COPIES, arg, is_impure, is_random, is_view
from blade.passes.manager import PassContext
from blade.ir.shapes import same_shape

aten = torch.ops.aten


def _source(node: Node) -> Node | None:
    """The input a no-op candidate would forward, if it is a tensor node."""
    src = node.args[0] if node.args else None
    return src if isinstance(src, Node) else None


def _always(node: Node) -> bool:
    return True


def _eval_dropout(node: Node) -> bool:
    return arg(node, "train") is False or arg(node, "p") == 0


def _same_layout_and_device(node: Node) -> bool:
    """A copy/cast that keeps the memory format and names no specific device index."""
    device = node.kwargs.get("device")
    return (node.kwargs.get("memory_format") in (None, torch.preserve_format)
            and (device is None or torch.device(device).index is None))


def _is_literal(value, *, exact_for_floats: bool = True) -> Callable[[Node], bool]:
    """The other operand is the literal `value` (never a bool; int 0 + -0.0 would give +0.0)."""
    def check(node: Node) -> bool:
        other = arg(node, "other")
        if isinstance(other, (Node, bool)) or other != value:
            return False
        return exact_for_floats or not node.dtype.is_floating_point
    return check


def _identity_permutation(node: Node) -> bool:
    dims = arg(node, "dims")
    return list(dims) == list(range(len(dims)))


def _same_axes(node: Node) -> bool:
    rank = max(len(node.shape), 1)
    return arg(node, "dim0") % rank == arg(node, "dim1") % rank


def _unit_step(node: Node) -> bool:
    return arg(node, "step") == 1


# target -> extra condition; every rule also requires the output meta to equal the input's.
NOOP_RULES: dict[object, Callable[[Node], bool]] = {
    **{op: _same_layout_and_device for op in TO_COPIES | {aten.clone.default}},
    **{op: _always for op in RESHAPES},
    aten.lift_fresh_copy.default: _always,
    aten.alias.default: _always,
    aten.detach.default: _always,
    aten.dropout.default: _eval_dropout,
    aten.type_as.default: _always,
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
    aten.sub.Tensor: _is_literal(0),
    aten.sub.Scalar: _is_literal(0),
    aten.add.Tensor: _is_literal(0, exact_for_floats=False),
    aten.add.Scalar: _is_literal(0, exact_for_floats=False),
}


def _same_meta(a, b) -> bool:
    return (isinstance(a, TensorMeta) and isinstance(b, TensorMeta) and a.dtype == b.dtype
            and a.device == b.device and same_shape(a.shape, b.shape))


def _reaches_output(graph: Graph, node: Node) -> bool:
    """True if `node`, or a view of it, is returned to the caller."""
    stack, seen = [node], {node}
    while stack:
        current = stack.pop()
        if graph.is_output(current):
            return True
        for user in graph.users(current):
            if user not in seen and (is_view(user.target) or user.target is operator.getitem) \
                    and _source(user) is current:
                seen.add(user)
                stack.append(user)
    return False


def _copy_is_needed(graph: Graph, node: Node, src: Node) -> bool:
    """A copy must stay if it feeds an output, or if it copies a view (it may densify the data)."""
    if node.target not in COPIES:  # a copy makes new memory: removing one is safe only where nobody could tell
        return False
    return _reaches_output(graph, node) or (src.op == "call" and is_view(src.target))


def _assert_holds(node: Node) -> bool:
    """An _assert_tensor_metadata whose every claim the input's meta already proves."""
    src = _source(node)
    meta = src.val if src is not None else None
    if not isinstance(meta, TensorMeta):
        return False
    dtype, size = arg(node, "dtype"), arg(node, "size")
    device, layout = arg(node, "device"), arg(node, "layout")
    return ((dtype is None or dtype == meta.dtype)
            and (device is None or (torch.device(device).type == meta.device and torch.device(device).index is None))
            and (layout is None or layout == torch.strided)
            and (size is None or (not any(isinstance(s, Node) for s in size) and same_shape(tuple(size), meta.shape)))
            and arg(node, "stride") is None)


def remove_proven_asserts(graph: Graph, ctx: PassContext) -> None:
    for node in graph.call_nodes:
        if node.target == aten._assert_tensor_metadata.default and _assert_holds(node) and ctx.allows(node.name):
            graph.remove_node(node)
            ctx.count("asserts_proven")


def remove_noops(graph: Graph, ctx: PassContext) -> None:
    for node in graph.call_nodes:
        rule = NOOP_RULES.get(node.target)
        src = _source(node)
        if rule is None or src is None or not _same_meta(node.val, src.val) or not rule(node):
            continue
        if _copy_is_needed(graph, node, src):
            continue
        if graph.is_output(node) and (src.op in ("input", "constant") or _reaches_output(graph, src)):
            continue  # the output would alias the caller's input, a weight, or another output
        if not ctx.allows(node.name):
            continue
        graph.replace_all_uses(node, src)
        graph.remove_node(node)
        ctx.count(f"noop:{format_target(node.target)}")


def _freeze(value):
    """A hashable key for an argument nest (nodes by identity; -0.0 and 0.0, 1 and 1.0 and True differ)."""
    if isinstance(value, Node):
        return ("node", id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, float):
        return ("float", repr(value), math.copysign(1.0, value))
    return (type(value).__name__, value)


def eliminate_common_subexpressions(graph: Graph, ctx: PassContext) -> None:
    seen: dict = {}
    for node in graph.call_nodes:
        if is_impure(node.target) or is_random(node.target):
            continue
        key = (node.target, _freeze(node.args), _freeze(node.kwargs))
        first = seen.setdefault(key, node)
        if first is node or (_reaches_output(graph, node) and _reaches_output(graph, first)):
            continue  # two outputs stay two tensors
        if not ctx.allows(node.name):
            continue
        graph.replace_all_uses(node, first)
        graph.remove_node(node)
        ctx.count("cse_merged")


def eliminate_dead_code(graph: Graph, ctx: PassContext) -> None:
    roots = graph.output_nodes + [n for n in graph.call_nodes if is_impure(n.target)]
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
