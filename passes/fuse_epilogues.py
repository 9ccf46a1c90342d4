"""Matmul epilogues: a linear layer with the activation and residual add that follow it, one region.

Matches: `linear(x, W, b)` or `addmm(b, x, W)` (or a bias-less matmul of a weight) read only by
an optional reshape/view, then an activation (GELU exact or tanh, ReLU, SiLU, sigmoid, tanh) read
only by the next step, then optionally a residual `+ r` of the same shape. Produces: a fused region
of kind "matmul_epilogue", pattern `<matmul>_<activation>[_residual]` (e.g. linear_gelu), attrs
with the matmul's form, the activation, and whether the weight is stored [out, in] (linear) or
[in, out] (addmm).

Leaves alone: a matmul read by more than one node (the activation would be computed twice or the
raw product kept too), an activation that is not elementwise on the product alone, a matmul with
nothing after it, and residual adds that a norm region already took.
"""
from __future__ import annotations

import torch

from blade.ir.fused import fusable
from blade.ir.graph import Graph, Node
from blade.ops import info
from blade.passes.fuse_norms import only_user, plain_add
from blade.passes.manager import PassContext
from blade.passes.rewrite import Plan, Region, commit_region_plans

aten = torch.ops.aten
EPILOGUE_ACTIVATIONS = {aten.gelu.default: "gelu", aten.relu.default: "relu", aten.silu.default: "silu",
               aten.sigmoid.default: "sigmoid", aten.tanh.default: "tanh"}


def _matmul_form(node: Node) -> str | None:
    """"linear" | "addmm" for a matmul of a constant weight, else None."""
    if node.target == aten.linear.default and not node.kwargs:
        w = node.args[1]
        if isinstance(w, Node) and w.op == "constant":
            return "linear"
    if node.target == aten.addmm.default and not node.kwargs:
        bias, _, w = node.args[:3]
        if isinstance(w, Node) and w.op == "constant" and isinstance(bias, Node) and bias.val.rank == 1:
            return "addmm"
    return None


def _activation_name(node: Node) -> str | None:
    name = EPILOGUE_ACTIVATIONS.get(node.target)
    if name is None or node.args[0] is None:
        return None
    if name == "gelu" and node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none") == "tanh":
        return "gelu_tanh"
    return name


def match_epilogue(graph: Graph, matmul: Node) -> Plan | None:
    """The matmul with the reshape, activation and residual add that read it, one after the other."""
    form = _matmul_form(matmul)
    if form is None:
        return None
    members, current = [matmul], matmul
    step = only_user(graph, current)
    if step is not None and step.target in info.RESHAPES and step.args[0] is current:
        after = only_user(graph, step)
        if after is not None and _activation_name(after) and after.args[0] is step:
            members, current = members + [step], step
    activation = None
    step = only_user(graph, current)
    if step is not None and _activation_name(step) and step.args[0] is current:
        activation = _activation_name(step)
        members, current = members + [step], step
    residual = False
    step = only_user(graph, current)
    if step is not None and plain_add(step) and step.args[0] is not step.args[1]:
        residual = True
        members, current = members + [step], step
    if len(members) == 1 or members[-1].target in info.RESHAPES or fusable(graph, members):
        return None
    pattern = "_".join([form] + ([activation] if activation else []) + (["residual"] if residual else []))
    attrs = {"matmul": form, "activation": activation or "none",
             "weight_layout": "out_in" if form == "linear" else "in_out"}
    return Plan(matmul.name, region=Region(members, "matmul_epilogue", pattern, attrs))


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Fuse every matmul epilogue the graph has."""
    return commit_region_plans(graph, ctx, "matmul_epilogue", lambda g, node: match_epilogue(g, node) if node.target
                               in (aten.linear.default, aten.addmm.default) else None)
