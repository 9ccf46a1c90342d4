"""The attention and norm passes alone, on IR captured straight from a table of spellings: what each rewrote
(structure), its numbers against eager on fresh random inputs, and the spellings it must leave exactly as they were."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blade.backends.onnxruntime.patterns import recognise
from blade.config import CompileConfig
from blade.ir.fused import is_fused
from blade.ir.graph import Graph
from blade.ops.attention import FLASH_ATTENTION
from blade.passes import attention, cleanup, fuse_epilogues, fuse_norms
from blade.passes.manager import run_pipeline

from helpers import assert_matches

aten = torch.ops.aten
B, H, S, D = 2, 3, 7, 8
HIDDEN = 16


class Fn(torch.nn.Module):
    """`fn(self, *tensors)` as a module, with a linear, a layer norm and an RMSNorm weight to call."""

    def __init__(self, fn):
        super().__init__()
        torch.manual_seed(0)
        self.fn, self.lin = fn, torch.nn.Linear(HIDDEN, HIDDEN)
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.weight = torch.nn.Parameter(torch.rand(HIDDEN) + 0.5)
        self.position = torch.nn.Parameter(torch.randn(1, 5, HIDDEN))
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, *tensors):
        return self.fn(self, *tensors)


def capture(fn, example) -> tuple[Fn, Graph]:
    model = Fn(fn).eval()
    return model, Graph.from_exported(torch.export.export(model, example))


def capture_clean(fn, example) -> tuple[Fn, Graph]:
    """The IR as the pipeline hands it to the passes after cleanup (torch.export's asserts gone)."""
    model, graph = capture(fn, example)
    return model, run_pipeline(graph, [cleanup.run], CompileConfig())[0]


def run(graph: Graph, fn) -> tuple[Graph, dict]:
    out, (record,) = run_pipeline(graph, [fn], CompileConfig(debug=True))
    return out, record


def calls(graph: Graph) -> list[str]:
    return [graph.format_node(n) for n in graph.call_nodes]


def check_numbers(model, graph, make_inputs, tol=1e-5):
    module = graph.to_fx()
    for seed in (1, 2, 3):
        fresh = make_inputs(torch.Generator().manual_seed(seed))
        with torch.no_grad():
            assert_matches(list(module(*fresh)), [model(*fresh)], tol=tol)


# -- attention -------------------------------------------------------------------------------------

def tril(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


# name -> (scores → output, the scale the op must get)
ATTENTION = {
    "div_after_matmul": (lambda m, q, k, v: (q @ k.transpose(-2, -1) / math.sqrt(D)).softmax(-1) @ v, D ** -0.5),
    "mul_after_matmul": (lambda m, q, k, v: (q @ k.transpose(-1, -2) * 0.25).softmax(-1) @ v, 0.25),
    "scale_before_matmul": (lambda m, q, k, v: ((q * 0.3) @ k.transpose(-1, -2)).softmax(-1) @ v, 0.3),
    "scale_on_k": (lambda m, q, k, v: (q @ (k / 4.0).transpose(-1, -2)).softmax(-1) @ v, 0.25),
    "scale_on_q_and_scores": (lambda m, q, k, v: ((q / 2.0) @ k.transpose(-1, -2) * 0.5).softmax(-1) @ v, 0.25),
    "constant_on_the_left": (lambda m, q, k, v: (0.2 * (q @ k.transpose(-1, -2))).softmax(-1) @ v, 0.2),
    "permuted_k": (lambda m, q, k, v: (q @ k.permute(0, 1, 3, 2) * 0.3).softmax(-1) @ v, 0.3),
    "k_given_transposed": (lambda m, q, kt, v: (q @ kt * 0.3).softmax(-1) @ v, 0.3),
    "fp64_softmax_cast_back": (lambda m, q, k, v: (q @ k.transpose(-1, -2) * 0.3).double().softmax(-1).to(q.dtype)
                               @ v, 0.3),
    "eval_dropout": (lambda m, q, k, v: F.dropout((q @ k.transpose(-1, -2) * 0.3).softmax(-1), 0.1, False) @ v, 0.3),
    "clone_of_probs": (lambda m, q, k, v: (q @ k.transpose(-1, -2) * 0.3).softmax(-1).clone() @ v, 0.3),
    "masked_fill_causal": (lambda m, q, k, v: (q @ k.transpose(-1, -2) * 0.3).masked_fill(
        ~tril(S), float("-inf")).softmax(-1) @ v, 0.3),
    "where_causal": (lambda m, q, k, v: torch.where(tril(S), q @ k.transpose(-1, -2) * 0.3, float("-inf"))
                     .softmax(-1) @ v, 0.3),
    "rank_3": (lambda m, q, k, v: (q[0] @ k[0].transpose(-1, -2) * 0.3).softmax(-1) @ v[0], 0.3),
}


def attention_inputs(name):
    def make(gen):
        q, k, v = (torch.randn(B, H, S, D, generator=gen) for _ in range(3))
        return (q, k.transpose(-1, -2).contiguous(), v) if name == "k_given_transposed" else (q, k, v)
    return make


@pytest.mark.parametrize("name", list(ATTENTION))
def test_each_attention_spelling_becomes_one_flash_attention(name):
    fn, scale = ATTENTION[name]
    make = attention_inputs(name)
    model, graph = capture_clean(fn, make(torch.Generator().manual_seed(0)))
    out, record = run(graph, attention.run)
    (flash,) = [n for n in out.call_nodes if n.target is FLASH_ATTENTION]
    assert record.counts["attention_replaced"] == 1 and not record.counts["softmax_left"], record.notes
    assert not any(n.target in (aten.softmax.int, aten._softmax.default) for n in out.call_nodes)
    assert flash.args[4] == pytest.approx(scale, rel=1e-12)
    assert flash.args[5] == ("causal" in name), "a tril mask is proven causal and dropped"
    assert flash.val.shape == ((1, H, S, D) if name == "rank_3" else (B, H, S, D))
    check_numbers(model, out, make)


UNTOUCHED = {  # spellings the op cannot take; the failing match must not leave anything behind
    "softmax_over_queries": lambda m, q, k, v: (q @ k.transpose(-1, -2)).softmax(-2) @ v,
    "probs_returned": lambda m, q, k, v: (lambda p: (p @ v, p))((q @ k.transpose(-1, -2)).softmax(-1)),
    "negative_scale": lambda m, q, k, v: (q @ k.transpose(-1, -2) * -0.3).softmax(-1) @ v,
    "finite_fill_not_causal": lambda m, q, k, v: (q @ k.transpose(-1, -2)).masked_fill(
        q[..., :1] > 0, -1e30).softmax(-1) @ v,
    # k needs a transpose added, and the output dtype then fails the match
    "k_given_transposed_output_fp64": lambda m, q, kt, v: (q @ kt).softmax(-1).double() @ v.double(),
}


@pytest.mark.parametrize("name", list(UNTOUCHED))
def test_spellings_the_op_cannot_take_are_left_exactly_as_they_were(name):
    make = attention_inputs("k_given_transposed" if "transposed" in name else name)
    model, graph = capture_clean(UNTOUCHED[name], make(torch.Generator().manual_seed(0)))
    before = calls(graph)
    out, record = run(graph, attention.run)
    assert calls(out) == before
    assert record.counts["softmax_left"] == 1 and any("left" in note for note in record.notes)


# -- residual add + norms --------------------------------------------------------------------------

def rms(x, w, square=lambda t: t.pow(2)):
    return x * torch.rsqrt(square(x).mean(-1, keepdim=True) + 1e-6) * w


# name -> (body, the pattern made, the ops in its body, ONNX Runtime's op and its operand roles)
NORMS = {
    "post_ln": (lambda m, x, r: m.norm(x + r), "skip_layer_norm", ["add", "layer_norm"],
                ("skip_layer_norm", {"input", "skip", "gamma", "beta"})),
    "skip_first": (lambda m, x, r: m.norm(r + x), "skip_layer_norm", ["add", "layer_norm"],
                   ("skip_layer_norm", {"input", "skip", "gamma", "beta"})),
    "linear_bias_moved_in": (lambda m, x, r: m.norm(m.lin(x) + r), "skip_layer_norm", ["add", "add", "layer_norm"],
                             ("skip_layer_norm", {"input", "skip", "gamma", "beta", "bias"})),
    "linear_on_the_right": (lambda m, x, r: m.norm(r + m.lin(x)), "skip_layer_norm", ["add", "add", "layer_norm"],
                            ("skip_layer_norm", {"input", "skip", "gamma", "beta", "bias"})),
    "h_plus_h_keeps_its_bias": (lambda m, x, r: (lambda h: m.norm(h + h))(m.lin(x)), "skip_layer_norm",
                                ["add", "layer_norm"], ("skip_layer_norm", {"input", "skip", "gamma", "beta"})),
    "position_broadcast": (lambda m, x, r: m.norm(x + m.position), "skip_layer_norm", ["add", "layer_norm"],
                           ("skip_layer_norm", {"input", "skip", "gamma", "beta"})),
    "sum_read_on": (lambda m, x, r: (lambda h: h + m.norm(h))(x + r), "skip_layer_norm", ["add", "layer_norm"],
                    ("skip_layer_norm", {"input", "skip", "gamma", "beta"})),
    "rms_pow": (lambda m, x, r: rms(x, m.weight), "rms_norm", ["pow", "mean", "add", "rsqrt", "mul", "mul"],
                ("rms_norm", {"input", "gamma"})),
    "rms_square_as_mul": (lambda m, x, r: rms(x, m.weight, lambda t: t * t), "rms_norm",
                          ["mul", "mean", "add", "rsqrt", "mul", "mul"], ("rms_norm", {"input", "gamma"})),
    "skip_rms": (lambda m, x, r: rms(x + r, m.weight), "skip_rms_norm",
                 ["add", "pow", "mean", "add", "rsqrt", "mul", "mul"], ("skip_rms_norm", {"input", "skip", "gamma"})),
}


def norm_inputs(gen):
    return torch.randn(2, 5, HIDDEN, generator=gen), torch.randn(2, 5, HIDDEN, generator=gen)


@pytest.mark.parametrize("name", list(NORMS))
def test_each_norm_spelling_becomes_one_region(name):
    fn, pattern, ops, (ort_op, roles) = NORMS[name]
    model, graph = capture_clean(fn, norm_inputs(torch.Generator().manual_seed(0)))
    out, record = run(graph, fuse_norms.run)
    (node,) = [n for n in out.call_nodes if is_fused(n)]
    region = node.target
    assert (region.kind, region.pattern) == ("reduction", pattern)
    assert [n.target._schema.name.split("::")[-1] for n in region.body.call_nodes] == ops
    assert record.counts[f"reduction:{pattern}"] == 1 and record.counts["regions"] == 1
    match = recognise(region)
    assert match.op == ort_op and {r for r, n in match.inputs.items() if n is not None} == roles
    if name == "sum_read_on":
        assert match.outputs == ["sum", "out"]
    check_numbers(model, out, norm_inputs)


@pytest.mark.parametrize("name, fn", [
    ("norm_over_two_axes", lambda m, x, r: F.layer_norm(x + r, (5, HIDDEN))),
    ("plain_layer_norm", lambda m, x, r: m.norm(x) + r),
    ("rms_without_keepdim", lambda m, x, r: x * torch.rsqrt(x.pow(2).mean(-1) + 1e-6)[..., None]),
])
def test_norms_the_pass_does_not_take_are_left_as_they_were(name, fn):
    model, graph = capture_clean(fn, norm_inputs(torch.Generator().manual_seed(0)))
    before = calls(graph)
    out, record = run(graph, fuse_norms.run)
    assert calls(out) == before and not record.counts


def test_a_held_back_site_is_left_and_named():
    """The accuracy bisection holds a norm back by its site: the pass asks before it commits, and leaves it."""
    model, graph = capture_clean(NORMS["linear_bias_moved_in"][0], norm_inputs(torch.Generator().manual_seed(0)))
    before = calls(graph)
    site = next(n.name for n in graph.call_nodes if n.target == aten.layer_norm.default)
    held_back = frozenset({("fuse_norms", site)})
    out, (record,) = run_pipeline(graph, [fuse_norms.run], CompileConfig(held_back=held_back))
    assert calls(out) == before and record.held_back == [site]


# -- matmul epilogues ------------------------------------------------------------------------------

EPILOGUES = {  # name -> (body, the pattern made)
    "linear_gelu": (lambda m, x, r: F.gelu(m.lin(x)), "linear_gelu"),
    "linear_gelu_tanh": (lambda m, x, r: F.gelu(m.lin(x), approximate="tanh"), "linear_gelu_tanh"),
    "linear_relu_residual": (lambda m, x, r: torch.relu(m.lin(x)) + r, "linear_relu_residual"),
    "residual_on_the_left": (lambda m, x, r: r + m.lin(x), "linear_residual"),
    "linear_silu": (lambda m, x, r: F.silu(m.lin(x)), "linear_silu"),
}


@pytest.mark.parametrize("name", list(EPILOGUES))
def test_each_epilogue_spelling_becomes_one_region(name):
    fn, pattern = EPILOGUES[name]
    model, graph = capture_clean(fn, norm_inputs(torch.Generator().manual_seed(0)))
    out, record = run(graph, fuse_epilogues.run)
    (node,) = [n for n in out.call_nodes if is_fused(n)]
    assert (node.target.kind, node.target.pattern) == ("matmul_epilogue", pattern)
    assert record.counts[f"matmul_epilogue:{pattern}"] == 1
    check_numbers(model, out, norm_inputs)


def test_a_product_read_twice_keeps_its_epilogue_out():
    """gelu(h) + h: fusing the GELU would compute h twice or keep it too, so nothing fuses."""
    model, graph = capture_clean(lambda m, x, r: (lambda h: F.gelu(h) + h)(m.lin(x)),
                                 norm_inputs(torch.Generator().manual_seed(0)))
    before = calls(graph)
    out, record = run(graph, fuse_epilogues.run)
    assert calls(out) == before and not record.counts
