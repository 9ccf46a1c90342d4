"""Fold an inference batch norm into the convolution that feeds it: conv → batch_norm(eval) becomes one conv.

Matches: `aten.batch_norm(conv(x, W, b, ...), γ, β, μ, σ², training=False, ..., ε)` (or torch.export's
`_native_batch_norm_legit_no_training(...)[0]`, whose statistics outputs nobody reads) where the convolution is a
plain (not transposed) conv1d/2d/3d whose only reader is the norm and every one of W, b, γ, β, μ, σ² is a
constant. Produces: `conv(x, W·s, (b − μ)·s + β, ...)` with s = γ / √(σ² + ε) per output channel, the new
weights computed in float64 and stored in the weight's dtype — before any lowering, so that a bf16 compile
rounds the folded weights once rather than the norm's output at every call. Every backend then runs one op
where it ran two (ONNX Runtime fuses Conv+BatchNormalization itself; eager, Inductor without freezing and
blade's Triton code do not).

Leaves alone: a norm in training mode, a norm over anything but such a convolution (a conv read twice, a
weight computed at run time), and a convolution whose arguments the norm does not follow directly.
"""
from __future__ import annotations

import operator

import torch

from blade.ir.graph import Graph, Node
from blade.passes.cleanup import eliminate_dead_code
from blade.passes.manager import PassContext

aten = torch.ops.aten
CONVS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                   aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding})
BATCH_NORM_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                   "cudnn_enabled")
# torch.export's inference form: (out, mean, rstd) = op(input, weight, bias, running_mean, running_var, momentum, eps)
LEGIT = aten._native_batch_norm_legit_no_training.default
LEGIT_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")


def _bound(node: Node, names: tuple[str, ...]) -> dict:
    """The call's arguments by name (positional and keyword)."""
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _constant(graph: Graph, value) -> torch.Tensor | None:
    """The tensor of a constant node; None for anything else."""
    if isinstance(value, Node) and value.op == "constant":
        return graph.constants[value.name]
    return None


def _normalized(graph: Graph, norm: Node) -> Node | None:
    """The node that holds the norm's output: the norm itself, or for the tuple form its only reader, out[0]."""
    if norm.target is aten.batch_norm.default:
        return norm
    readers = graph.users(norm)
    if norm.target is LEGIT and len(readers) == 1 and readers[0].target is operator.getitem \
            and readers[0].args[1] == 0 and not graph.is_output(norm):
        return readers[0]
    return None


def _folded(graph: Graph, norm: Node) -> tuple[Node, torch.Tensor, torch.Tensor] | None:
    """(the convolution, its folded weight, its folded bias) when `norm` folds into the conv before it."""
    bn = _bound(norm, BATCH_NORM_ARGS if norm.target is aten.batch_norm.default else LEGIT_ARGS)
    conv = bn.get("input")
    if bn.get("training", False) or not isinstance(conv, Node) or conv.op != "call" or conv.target not in CONVS:
        return None
    if conv.kwargs or len(graph.users(conv)) != 1 or graph.is_output(conv):
        return None
    weight = _constant(graph, conv.args[1])
    bias_ref = conv.args[2] if len(conv.args) > 2 else None
    bias = _constant(graph, bias_ref)
    mean, var = _constant(graph, bn.get("running_mean")), _constant(graph, bn.get("running_var"))
    gamma_ref, beta_ref = bn.get("weight"), bn.get("bias")
    gamma, beta = _constant(graph, gamma_ref), _constant(graph, beta_ref)
    if weight is None or mean is None or var is None or (bias_ref is not None and bias is None) \
            or (gamma_ref is not None and gamma is None) or (beta_ref is not None and beta is None):
        return None
    if not weight.is_floating_point() or weight.shape[0] != mean.shape[0]:
        return None
    wide = torch.float64
    scale = torch.rsqrt(var.to(wide) + float(bn.get("eps", 1e-5)))
    if gamma is not None:
        scale = scale * gamma.to(wide)
    shift = -mean.to(wide) * scale
    if bias is not None:
        shift = shift + bias.to(wide) * scale
    if beta is not None:
        shift = shift + beta.to(wide)
    new_weight = (weight.to(wide) * scale.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype).contiguous()
    return conv, new_weight, shift.to(weight.dtype).contiguous()


def run(graph: Graph, ctx: PassContext) -> Graph:
    for norm in list(graph.call_nodes):
        if norm.target not in (aten.batch_norm.default, LEGIT):
            continue
        out = _normalized(graph, norm)
        found = _folded(graph, norm) if out is not None else None
        if found is None or not ctx.allows(norm.name):
            continue
        conv, weight, bias = found
        weight_node = graph.add_constant(f"{conv.name}_bn_weight", weight, f"{conv.args[1].target} (batch norm folded)")
        bias_node = graph.add_constant(f"{conv.name}_bn_bias", bias, f"{norm.name} (folded into {conv.name})")
        args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
        args[1], args[2] = weight_node, bias_node
        meta = dict(conv.meta)
        meta["val"] = out.meta["val"]
        folded = graph.add_node(conv.target, tuple(args), {}, meta=meta, name=conv.name)
        graph.replace_all_uses(out, folded)
        if out is not norm:
            graph.remove_node(out)
        graph.remove_node(norm)
        graph.remove_node(conv)
        ctx.count("batch_norm_folded")
    eliminate_dead_code(graph, ctx)
    return graph
