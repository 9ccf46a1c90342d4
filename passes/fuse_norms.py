"""Norm fusion: residual add + layer norm, and RMSNorm as written by hand, each into one region.

Matches:
- skip_layer_norm: `layer_norm(a + b)` over the last axis, a and b of the same dtype and shape
  (or b broadcast over leading dims: a position embedding [1, S, H] added to [B, S, H]);
  when a (or b) is a `linear` with a constant bias read only by this add, the bias add moves into
  the region (the linear keeps just its matmul), as ONNX Runtime's SkipLayerNormalization takes it.
- rms_norm: `x * rsqrt(mean(x², -1, keepdim) + eps)` (x² as pow(x, 2) or x * x), optionally times
  a weight; skip_rms_norm when x itself is `a + b` of equal shapes.
A sum (a + b) that is also read elsewhere (the residual stream of a pre-norm transformer) becomes a
second output of the region. Produces: fused regions of kind "reduction" whose attrs hold eps and
the roles of their inputs (input, skip, gamma, beta, bias) and outputs (out, sum).

Leaves alone: norms over more than the last axis, adds that broadcast, intermediate values read
outside the pattern (a variance returned to the caller), norms whose input another region took.
"""
from __future__ import annotations

import torch

from blade.ir.fused import fusable, fuse
from blade.ir.graph import Graph, Node, TensorMeta
from blade.passes.cleanup import _arg
from blade.passes.manager import PassContext
from blade.ir.shapes import same_shape

aten = torch.ops.aten
RSQRT = aten.rsqrt.default


def _tensor(x) -> bool:
    return isinstance(x, Node) and isinstance(x.val, TensorMeta)


def plain_add(node: Node) -> bool:
    """`a + b` of two tensors with the result's shape and dtype (no alpha, no broadcast)."""
    if node.op != "call" or node.target != aten.add.Tensor or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return False
    a, b = node.args
    return _tensor(a) and _tensor(b) and all(
        same_shape(x.val.shape, node.val.shape) and x.val.dtype == node.val.dtype for x in (a, b))


def _broadcasts_over_leading(small: tuple, full: tuple) -> bool:
    """`small` is `full` with some leading dims 1 or absent, e.g. [1, S, H] or [S, H] for [B, S, H]."""
    if len(small) > len(full) or len(small) == 0:
        return False
    offset = len(full) - len(small)
    trailing = next((i for i, s in enumerate(small) if s != 1), len(small))
    return same_shape(tuple(small[trailing:]), tuple(full[offset + trailing:])) and trailing < len(small)


def skip_add(node: Node) -> tuple[Node, Node] | None:
    """(input, skip) of a residual `input + skip`: input has the result's shape; skip the same, or
    one broadcast over leading dims (a position embedding [1, S, H] added to [B, S, H])."""
    if node.op != "call" or node.target != aten.add.Tensor or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    if not (_tensor(a) and _tensor(b)) or a.val.dtype != node.val.dtype or b.val.dtype != node.val.dtype:
        return None
    full = node.val.shape
    for first, second in ((a, b), (b, a)):
        if same_shape(first.val.shape, full) and (same_shape(second.val.shape, full)
                                                  or _broadcasts_over_leading(second.val.shape, full)):
            return first, second
    return None


def only_user(graph: Graph, node: Node) -> Node | None:
    users = graph.users(node)
    return users[0] if len(users) == 1 and not graph.is_output(node) else None


def split_bias(graph: Graph, linear: Node, reader: Node) -> Node | None:
    """linear(x, W, b) read only by `reader` → linear(x, W) then add(·, b); returns the add."""
    if linear.target != aten.linear.default or len(linear.args) < 3 or linear.kwargs:
        return None
    bias = linear.args[2]
    if not (isinstance(bias, Node) and bias.op == "constant" and bias.val.rank == 1):
        return None
    if only_user(graph, linear) is not reader:
        return None
    graph.set_args(linear, linear.args[:2])
    add = graph.add_node(aten.add.Tensor, (linear, bias), {}, dict(linear.meta), name=f"{linear.name}_bias")
    graph.replace_all_uses(linear, add)
    return add


def _sum_role(graph: Graph, total: Node, members: list[Node]) -> dict:
    inside = set(members)
    escapes = graph.is_output(total) or any(u not in inside for u in graph.users(total))
    return {total: "sum"} if escapes else {}


def fuse_skip_layer_norm(graph: Graph, ln: Node, ctx: PassContext) -> bool:
    x, shape = ln.args[0], _arg(ln, 1, "normalized_shape")
    operands = skip_add(x) if isinstance(x, Node) else None
    if operands is None or len(shape) != 1 or shape[0] != x.val.shape[-1] or not ctx.allows(ln.name):
        return False
    weight, beta, eps = _arg(ln, 2, "weight"), _arg(ln, 3, "bias"), _arg(ln, 4, "eps", 1e-5)
    a, b = operands
    members, bias = [x, ln], None
    # no split for h + h: the bias would be added once where the sum holds it twice
    candidates = () if a is b else ((a, b), (b, a)) if plain_add(x) else ((a, b),)
    for first, second in candidates:
        bias_add = split_bias(graph, first, x)
        if bias_add is not None:
            members, bias = [bias_add, x, ln], bias_add.args[1]
            a, b = bias_add.args[0], second
            break
    if fusable(graph, members):
        return False
    fuse(graph, members, "reduction", "skip_layer_norm", {"eps": float(eps)},
         roles={"input": a, "skip": b, "gamma": weight, "beta": beta, "bias": bias},
         output_roles={ln: "out", **_sum_role(graph, x, members)})
    ctx.count("reduction:skip_layer_norm")
    return True


def _square_of(node: Node) -> Node | None:
    if node.target == aten.pow.Tensor_Scalar and node.args[1] == 2:
        return node.args[0]
    if node.target == aten.mul.Tensor and len(node.args) == 2 and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _other(node: Node, one: Node):
    """The argument of a binary node that is not `one` (None if `one` is not an argument)."""
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


def fuse_rms_norm(graph: Graph, mean: Node, ctx: PassContext) -> bool:
    if mean.target != aten.mean.dim or not _arg(mean, 2, "keepdim", False):
        return False
    square = mean.args[0]
    x = _square_of(square) if isinstance(square, Node) else None
    if x is None or list(_arg(mean, 1, "dim")) not in ([-1], [x.val.rank - 1]) or only_user(graph, square) is not mean:
        return False
    add = only_user(graph, mean)
    if add is None or add.target not in (aten.add.Tensor, aten.add.Scalar) or add.args[0] is not mean \
            or not isinstance(add.args[1], (int, float)):
        return False
    rsqrt = only_user(graph, add)
    scaled = only_user(graph, rsqrt) if rsqrt is not None and rsqrt.target == RSQRT else None
    if scaled is None or scaled.target != aten.mul.Tensor or _other(scaled, rsqrt) is not x:
        return False
    members, out, weight = [square, mean, add, rsqrt, scaled], scaled, None
    weigher = only_user(graph, scaled)
    if weigher is not None and weigher.target == aten.mul.Tensor:
        w = _other(weigher, scaled)
        if isinstance(w, Node) and w.op == "constant" and w.val.rank == 1 and same_shape(weigher.val.shape, x.val.shape):
            members, out, weight = members + [weigher], weigher, w
    if out.val.dtype != x.val.dtype:
        return False
    roles = {"input": x, "gamma": weight}
    pattern = "rms_norm"
    if skip_add(x):
        members = [x] + members
        first, second = skip_add(x)
        roles = {"input": first, "skip": second, "gamma": weight}
        pattern = "skip_rms_norm"
    if fusable(graph, members) or not ctx.allows(mean.name):
        return False
    output_roles = {out: "out", **(_sum_role(graph, x, members) if pattern == "skip_rms_norm" else {})}
    fuse(graph, members, "reduction", pattern, {"eps": float(add.args[1])}, roles=roles, output_roles=output_roles)
    ctx.count(f"reduction:{pattern}")
    return True


def run(graph: Graph, ctx: PassContext) -> None:
    """Fuse every skip-layer-norm and RMSNorm the graph has."""
    for node in graph.call_nodes:
        if node not in graph:
            continue
        if node.target == aten.layer_norm.default:
            fuse_skip_layer_norm(graph, node, ctx)
        elif node.target == aten.mean.dim:
            fuse_rms_norm(graph, node, ctx)
