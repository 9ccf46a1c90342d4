"""The fused-region shapes ONNX Runtime has contrib ops for, recognised in a region's body.

blade's fusion passes make regions by kind (loop, reduction, matmul_epilogue); what ONNX Runtime's
SkipLayerNormalization, SkipSimplifiedLayerNormalization, SimplifiedLayerNormalization and
BiasGelu/FastGelu take is ONNX Runtime's business, so this backend reads it off the body: which
body input plays which operand of the op (input, skip, gamma, beta, bias; input, weight, bias)
and which body output is which of the op's outputs (out, sum). A body that is not exactly one of
these shapes is no match (it goes to ONNX Runtime as its plain ops).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from blade.ir.fused import FusedRegion
from blade.ir.graph import Graph, Node
from blade.ir.shapes import same_shape
from blade.ops.info import arg

aten = torch.ops.aten


@dataclass
class Match:
    """A region recognised as one of ONNX Runtime's fused ops: `op`, its operands and outputs by role."""

    op: str  # "skip_layer_norm", "skip_rms_norm", "rms_norm", "matmul_gelu"
    inputs: dict[str, Node | None]  # role -> body input (None where the op's operand is absent)
    outputs: list[str] = field(default_factory=list)  # the role of each body output, in order
    attrs: dict = field(default_factory=dict)

    def operand(self, body: Graph, args: tuple, role: str):
        """The call argument playing `role`, or None."""
        node = self.inputs.get(role)
        return None if node is None else args[body.inputs.index(node)]


def _only(body: Graph, target) -> Node | None:
    found = [n for n in body.call_nodes if n.target == target]
    return found[0] if len(found) == 1 else None


def _input_and_skip(total: Node) -> tuple[Node, Node] | None:
    """(input, skip) of a residual add: the input has the sum's shape, the skip its shape or a broadcast one."""
    if total.target != aten.add.Tensor or len(total.args) != 2 or total.kwargs:
        return None
    a, b = total.args
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return None
    return (a, b) if same_shape(a.val.shape, total.val.shape) else (b, a)


def _with_bias(body: Graph, total: Node) -> tuple[Node, Node, Node | None] | None:
    """(input, skip, bias) of `total = input + skip`, where the input may be `x + bias` inside the body."""
    operands = _input_and_skip(total)
    if operands is None:
        return None
    first, second = total.args
    for inner, other in ((first, second), (second, first)):
        if inner.op == "call":
            bias_add = inner.target == aten.add.Tensor and all(a.op == "input" for a in inner.args)
            if not bias_add or inner.args[1].val.rank != 1:
                return None
            return inner.args[0], other, inner.args[1]
    return (*operands, None)


def _skip_layer_norm(body: Graph) -> Match | None:
    ln = _only(body, aten.layer_norm.default)
    total = ln.args[0] if ln is not None else None
    if not isinstance(total, Node) or total.op != "call" or len(arg(ln, "normalized_shape")) != 1:
        return None
    found = _with_bias(body, total)
    if found is None:
        return None
    x, skip, bias = found
    inside = {ln, total} | {a for a in total.args if a.op == "call"}
    if set(body.call_nodes) != inside or not all(a.op == "input" for a in (x, skip)):
        return None
    gamma, beta = arg(ln, "weight"), arg(ln, "bias")
    return Match("skip_layer_norm", {"input": x, "skip": skip, "gamma": gamma, "beta": beta, "bias": bias},
                 _output_roles(body, ln, total), {"eps": float(arg(ln, "eps", 1e-5))})


def _rms_norm(body: Graph) -> Match | None:
    """x * rsqrt(mean(x², -1, keepdim) + eps) * gamma, x a body input or a residual sum."""
    rsqrt = _only(body, aten.rsqrt.default)
    if rsqrt is None:
        return None
    add_eps = rsqrt.args[0]
    mean = add_eps.args[0] if add_eps.op == "call" else None
    if mean is None or mean.target != aten.mean.dim or not isinstance(add_eps.args[1], (int, float)):
        return None
    square = mean.args[0]
    x = square.args[0] if square.op == "call" else None
    if x is None or square.target not in (aten.pow.Tensor_Scalar, aten.mul.Tensor) or not arg(mean, "keepdim"):
        return None
    scaled = body.users(rsqrt)
    if len(scaled) != 1 or scaled[0].target != aten.mul.Tensor:
        return None
    out = scaled[0]
    weighers = body.users(out)
    gamma = None
    if len(weighers) == 1 and weighers[0].target == aten.mul.Tensor:
        gamma = next((a for a in weighers[0].args if a is not out), None)
        out = weighers[0]
    chain = {square, mean, add_eps, rsqrt, scaled[0], out}
    if x.op == "input":
        if set(body.call_nodes) != chain:
            return None
        return Match("rms_norm", {"input": x, "gamma": gamma}, _output_roles(body, out, None),
                     {"eps": float(add_eps.args[1])})
    operands = _input_and_skip(x)
    if operands is None or set(body.call_nodes) != chain | {x} or not all(a.op == "input" for a in operands):
        return None
    return Match("skip_rms_norm", {"input": operands[0], "skip": operands[1], "gamma": gamma, "bias": None},
                 _output_roles(body, out, x), {"eps": float(add_eps.args[1])})


def _output_roles(body: Graph, out: Node, total: Node | None) -> list[str]:
    return ["out" if o is out else "sum" if o is total else "?" for o in body.outputs]


def _matmul_gelu(region: FusedRegion) -> Match | None:
    """A matmul epilogue whose activation is GELU (exact or tanh) on a biased product."""
    if region.attrs.get("activation") not in ("gelu", "gelu_tanh"):
        return None
    matmul = region.body.call_nodes[0]
    if matmul.target == aten.linear.default:
        x, weight, bias = (*matmul.args, None)[:3]
    elif matmul.target == aten.addmm.default:
        bias, x, weight = matmul.args[:3]
    else:
        return None
    if bias is None:
        return None
    return Match("matmul_gelu", {"input": x, "weight": weight, "bias": bias})


def recognise(region: FusedRegion) -> Match | None:
    """The ONNX Runtime fused op this region is, if any."""
    if region.kind == "matmul_epilogue":
        return _matmul_gelu(region)
    if region.kind != "reduction":
        return None
    found = _skip_layer_norm(region.body) or _rms_norm(region.body)
    return found if found is not None and "?" not in found.outputs else None
