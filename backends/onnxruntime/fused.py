"""Fused regions → ONNX Runtime's fused `com.microsoft` ops, where one exists and is faster.

At export, each fused node whose body is a shape ONNX Runtime has an op for (recognised in
backends/onnxruntime/patterns.py) calls a `blade_ort::` custom op instead of its body;
torch.onnx.export then translates that op through TRANSLATIONS:

| region body                    | ONNX Runtime op                                        |
|--------------------------------|--------------------------------------------------------|
| skip_layer_norm (CUDA only)    | com.microsoft SkipLayerNormalization (bias, sum output)|
| skip_rms_norm                  | com.microsoft SkipSimplifiedLayerNormalization         |
| rms_norm                       | SimplifiedLayerNormalization (ONNX Runtime's, ONNX domain) |
| linear/addmm + gelu (+ …)      | MatMul + com.microsoft BiasGelu                        |
| linear/addmm + gelu tanh (+ …) | MatMul + com.microsoft FastGelu (with bias)            |

Which patterns take the contrib op depends on the device, by measurement (CONTRIB_PATTERNS,
bench/ort_fused_ops.py, bench/results/ort_fused_ops.md): on CPU, ONNX Runtime 1.32's
SkipLayerNormalization kernel is 2.7-5.3x slower than the Add + Add + LayerNormalization it
replaces, so skip_layer_norm regions go to ONNX Runtime as those plain ops, and its session-time
SkipLayerNormFusion is switched off (DISABLED_OPTIMIZERS) so that it does not fuse them back; the
RMSNorm and GELU ops are faster than their plain forms and are used. On CUDA every op is used
(not yet measured there).

Every other region — and these, when their operands do not fit the op (no gamma, a broadcast
skip, no bias) — is exported as its body, plain ONNX, which ONNX Runtime's own optimizer fuses
as it can. The `blade_ort::` ops exist only during export: they never enter the IR or an artifact.
"""
from __future__ import annotations

from typing import Callable, Optional

import onnxscript
import torch
import torch.nn.functional as F

from blade.ir.fused import FusedRegion
from blade.ir.graph import Node, map_refs
from blade.ir.shapes import same_shape
from blade.backends.onnxruntime.patterns import Match, recognise

msft = onnxscript.values.Opset("com.microsoft", 1)
onnx_ort = onnxscript.values.Opset("", 20)  # ONNX Runtime's own ops in the ONNX domain


@torch.library.custom_op("blade_ort::skip_norm", mutates_args=())
def skip_norm(x: torch.Tensor, skip: torch.Tensor, gamma: torch.Tensor, beta: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], eps: float, simplified: bool) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + skip if bias is None else x + bias + skip
    if simplified:
        out = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps) * gamma
    else:
        out = F.layer_norm(total, (total.shape[-1],), gamma, beta, eps)
    return out, total


@skip_norm.register_fake
def _skip_norm_fake(x, skip, gamma, beta, bias, eps, simplified):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("blade_ort::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma


@rms_norm.register_fake
def _rms_norm_fake(x, gamma, eps):
    return torch.empty_like(x)


@torch.library.custom_op("blade_ort::matmul_bias_gelu", mutates_args=())
def matmul_bias_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(x @ weight + bias, approximate=approximate)


@matmul_bias_gelu.register_fake
def _matmul_bias_gelu_fake(x, weight, bias, approximate):
    return x.new_empty((*x.shape[:-1], weight.shape[-1]))


# -- ONNX translations (torch.onnx.export custom_translation_table) ------------------------------

def skip_norm_onnx(x, skip, gamma, beta=None, bias=None, eps: float = 1e-5, simplified: bool = False):
    if simplified:
        out, _, _, total = msft.SkipSimplifiedLayerNormalization(x, skip, gamma, bias, epsilon=eps)
    else:
        out, _, _, total = msft.SkipLayerNormalization(x, skip, gamma, beta, bias, epsilon=eps)
    return out, total


def rms_norm_onnx(x, gamma, eps: float = 1e-6):
    return onnx_ort.SimplifiedLayerNormalization(x, gamma, axis=-1, epsilon=eps)


def matmul_bias_gelu_onnx(x, weight, bias, approximate: str = "none"):
    product = onnxscript.opset20.MatMul(x, weight)
    return msft.FastGelu(product, bias) if approximate == "tanh" else msft.BiasGelu(product, bias)


def register_schemas(register_contrib_schema) -> dict:
    """Declare the ops' schemas to onnx and return their translation table entries."""
    register_contrib_schema("SkipLayerNormalization", outputs=4)
    register_contrib_schema("SkipSimplifiedLayerNormalization", outputs=4)
    register_contrib_schema("SimplifiedLayerNormalization", outputs=1, domain="")
    register_contrib_schema("BiasGelu")
    register_contrib_schema("FastGelu")
    return {torch.ops.blade_ort.skip_norm.default: skip_norm_onnx,
            torch.ops.blade_ort.rms_norm.default: rms_norm_onnx,
            torch.ops.blade_ort.matmul_bias_gelu.default: matmul_bias_gelu_onnx}


# -- lowering a fused node at export ------------------------------------------------------------

class Lowered:
    """What an exported fused node calls instead of its body: the region's ONNX Runtime form."""

    __module__ = __name__

    def __init__(self, region: FusedRegion, match: Match, fn: Callable):
        self.region, self.match, self.fn = region, match, fn
        self.__name__ = f"ort_{match.op}"

    def __call__(self, *args):
        return self.fn(self.region, self.match, *args)


def _outputs(match: Match, values: dict):
    outs = tuple(values[role] for role in match.outputs)
    return outs if len(outs) > 1 else outs[0]


def _meta(match: Match, role: str):
    node = match.inputs.get(role)
    return None if node is None else node.val


def _skip_fits(match: Match) -> bool:
    """ONNX Runtime's skip norms take a 2-D or 3-D input and a skip of its shape, or for a 3-D
    [B, S, H] input [1, S, H] or [S, H]; gamma (and beta, bias) must be [H]."""
    x, skip = _meta(match, "input"), _meta(match, "skip")
    if x is None or skip is None or x.rank not in (2, 3) or not _per_channel(match, x):
        return False
    if x.rank == 2:
        return same_shape(skip.shape, x.shape)
    if skip.rank == 3:
        batch_fits = skip.shape[0] == 1 or same_shape(skip.shape[:1], x.shape[:1])
        return batch_fits and same_shape(skip.shape[1:], x.shape[1:])
    return skip.rank == 2 and same_shape(skip.shape, x.shape[1:])


def _per_channel(match: Match, x) -> bool:
    """gamma, beta and bias, where given, are [H] (ONNX Runtime's norms take nothing else)."""
    return all(meta is None or same_shape(meta.shape, x.shape[-1:])
               for meta in (_meta(match, r) for r in ("gamma", "beta", "bias")))


def _lower_skip_norm(region: FusedRegion, match: Match, *args):
    operand = lambda role: match.operand(region.body, args, role)  # noqa: E731
    out, total = torch.ops.blade_ort.skip_norm(
        operand("input"), operand("skip"), operand("gamma"), operand("beta"), operand("bias"),
        match.attrs["eps"], match.op == "skip_rms_norm")
    return _outputs(match, {"out": out, "sum": total})


def _lower_rms_norm(region: FusedRegion, match: Match, *args):
    operand = lambda role: match.operand(region.body, args, role)  # noqa: E731
    return _outputs(match, {"out": torch.ops.blade_ort.rms_norm(operand("input"), operand("gamma"),
                                                                match.attrs["eps"])})


def _lower_matmul_gelu(region: FusedRegion, match: Match, *args):
    """The body, with its matmul + bias + GELU as one MatMul + BiasGelu/FastGelu (views commute)."""
    body = region.body
    env: dict[Node, object] = dict(zip(body.inputs, args))
    matmul = body.call_nodes[0]
    weight = match.operand(body, args, "weight")
    if region.attrs["weight_layout"] == "out_in":
        weight = weight.t()
    approximate = "tanh" if region.attrs["activation"] == "gelu_tanh" else "none"
    for node in body.call_nodes:
        if node is matmul:
            env[node] = torch.ops.blade_ort.matmul_bias_gelu(match.operand(body, args, "input"), weight,
                                                             match.operand(body, args, "bias"), approximate)
        elif node.target == torch.ops.aten.gelu.default:
            env[node] = env[node.args[0]]
        else:
            env[node] = node.target(*map_refs(node.args, env.__getitem__), **map_refs(node.kwargs, env.__getitem__))
    outs = tuple(env[o] for o in body.outputs)
    return outs if len(outs) > 1 else outs[0]


# Patterns lowered to their contrib op, per device (see the module docstring for the measurements).
CONTRIB_PATTERNS = {
    "cpu": {"skip_rms_norm", "rms_norm", "matmul_gelu"},
    "cuda": {"skip_layer_norm", "skip_rms_norm", "rms_norm", "matmul_gelu"},
}
# ONNX Runtime optimizers a session must not run, per device: they would fuse back what blade
# deliberately hands over unfused.
DISABLED_OPTIMIZERS = {"cpu": ["SkipLayerNormFusion"], "cuda": []}


def lowering(region: FusedRegion, device: str = "cpu") -> Lowered | None:
    """The ONNX Runtime form of the region on `device`, or None to export its body as it is."""
    match = recognise(region)
    wanted = CONTRIB_PATTERNS.get(device, CONTRIB_PATTERNS["cpu"])
    if match is None or match.op not in wanted:
        return None
    if match.op == "matmul_gelu":
        return Lowered(region, match, _lower_matmul_gelu)
    if match.inputs.get("gamma") is None:
        return None
    if match.op in ("skip_layer_norm", "skip_rms_norm") and _skip_fits(match):
        return Lowered(region, match, _lower_skip_norm)
    if match.op == "rms_norm" and _per_channel(match, _meta(match, "input")):
        return Lowered(region, match, _lower_rms_norm)
    return None


def lower_fused_nodes(module: torch.fx.GraphModule, device: str = "cpu") -> int:
    """Point every fused node of `module` that has an ONNX Runtime form on `device` at it; returns how many."""
    count = 0
    for node in module.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, FusedRegion):
            lowered = lowering(node.target, device)
            if lowered is not None:
                node.target = lowered
                count += 1
    if count:
        module.recompile()
    return count
