"""Norm fusion: residual add + layer norm, and RMSNorm as written by hand, each into one region.

Matches:
- skip_layer_norm: `layer_norm(a + b)` over the last axis, a and b of the same dtype and shape
  (or b broadcast over leading dims: a position embedding [1, S, H] added to [B, S, H]);
  when a (or b) is a `linear` with a constant bias read only by this add, the bias add moves into
  the region (the linear keeps just its matmul: one pass over the rows adds bias, skip and norms).
- rms_norm: `x * rsqrt(mean(x², -1, keepdim) + eps)` (x² as pow(x, 2) or x * x), optionally times
  a weight; skip_rms_norm when x itself is `a + b` of equal shapes.
A sum (a + b) that is also read elsewhere (the residual stream of a pre-norm transformer) becomes a
second output of the region. Produces: fused regions of kind "reduction" whose attrs hold eps (a
backend that has a fused op for one of these reads the operands' roles off the body itself).

Leaves alone: norms over more than the last axis, adds that broadcast, intermediate values read
outside the pattern (a variance returned to the caller), norms whose input another region took.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from blade.ir.fused import fusable
from blade.ir.graph import Graph, Node, TensorMeta
from blade.ir.shapes import same_shape
from blade.ops.info import arg
from blade.passes.manager import PassContext
from blade.passes.rewrite import New, Plan, Region, commit_region_plans

aten = torch.ops.aten


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


def bias_split(graph: Graph, linear: Node, reader: Node) -> tuple[Plan, New] | None:
    """The plan linear(x, W, b) → linear(x, W) then add(·, b) when only `reader` reads the linear, and the add."""
    if linear.target != aten.linear.default or len(linear.args) < 3 or linear.kwargs:
        return None
    bias = linear.args[2]
    if not (isinstance(bias, Node) and bias.op == "constant" and bias.val.rank == 1):
        return None
    if only_user(graph, linear) is not reader:
        return None
    add = New(aten.add.Tensor, (linear, bias), name=f"{linear.name}_bias")
    return Plan(linear.name, rewire=[(linear, linear.args[:2])], reroute=[(linear, add)]), add


def match_skip_layer_norm(graph: Graph, ln: Node) -> Plan | None:
    """`layer_norm(a + b)` over the last axis, with a linear's bias moved in when one operand is that linear."""
    x, shape = ln.args[0], arg(ln, "normalized_shape")
    operands = skip_add(x) if isinstance(x, Node) else None
    if operands is None or len(shape) != 1 or shape[0] != x.val.shape[-1]:
        return None
    if fusable(graph, [x, ln]):  # a moved bias adds a constant input only: [x, ln] decides for both
        return None
    a, b = operands
    # no split for h + h: the bias would be added once where the sum holds it twice
    candidates = () if a is b else ((a, b), (b, a)) if plain_add(x) else ((a, b),)
    split = next((found for first, _ in candidates if (found := bias_split(graph, first, x))), None)
    eps = float(arg(ln, "eps"))
    region = Region([x, ln] if split is None else [split[1], x, ln], "reduction", "skip_layer_norm", {"eps": eps})
    if split is None:
        return Plan(ln.name, region=region)
    return replace(split[0], site=ln.name, region=region)


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


def match_rms_norm(graph: Graph, mean: Node) -> Plan | None:
    """`x * rsqrt(mean(x², -1, keepdim) + eps)` [* weight], with x's residual add when x = a + b."""
    if mean.target != aten.mean.dim or not arg(mean, "keepdim"):
        return None
    square = mean.args[0]
    x = _square_of(square) if isinstance(square, Node) else None
    if x is None or list(arg(mean, "dim")) not in ([-1], [x.val.rank - 1]) or only_user(graph, square) is not mean:
        return None
    add = only_user(graph, mean)
    if add is None or add.target not in (aten.add.Tensor, aten.add.Scalar) or add.args[0] is not mean \
            or not isinstance(add.args[1], (int, float)):
        return None
    rsqrt = only_user(graph, add)
    scaled = only_user(graph, rsqrt) if rsqrt is not None and rsqrt.target == aten.rsqrt.default else None
    if scaled is None or scaled.target != aten.mul.Tensor or _other(scaled, rsqrt) is not x:
        return None
    members, out = [square, mean, add, rsqrt, scaled], scaled
    weigher = only_user(graph, scaled)
    if weigher is not None and weigher.target == aten.mul.Tensor:
        w = _other(weigher, scaled)
        if isinstance(w, Node) and w.op == "constant" and w.val.rank == 1 \
                and same_shape(weigher.val.shape, x.val.shape):
            members, out = members + [weigher], weigher
    if out.val.dtype != x.val.dtype:
        return None
    pattern = "rms_norm"
    if skip_add(x):
        members, pattern = [x] + members, "skip_rms_norm"
    if fusable(graph, members):
        return None
    return Plan(mean.name, region=Region(members, "reduction", pattern, {"eps": float(add.args[1])}))


MATCHERS = {aten.layer_norm.default: match_skip_layer_norm, aten.mean.dim: match_rms_norm}


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Fuse every skip-layer-norm and RMSNorm the graph has."""
    return commit_region_plans(graph, ctx, "reduction", lambda g, node: MATCHERS[node.target](g, node) if node.target
                               in MATCHERS else None)
