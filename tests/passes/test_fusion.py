"""fusion (fuse_norms, fuse_epilogues, fuse_loops): each fused kind (structure), numbers against eager on both
backends, graphs it leaves alone."""
from __future__ import annotations

import math
from collections import Counter

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import blade
from blade.errors import GraphError
from blade.ir.fused import FusedRegion, creates_cycle, fuse, is_fused
from blade.backends.onnxruntime.patterns import recognise
from blade.passes import FUSION, activations, cleanup

from helpers import Apply, assert_matches

aten = torch.ops.aten
H = 16


class Block(torch.nn.Module):
    """Linear layers and norms in the arrangements the fusion patterns look for."""

    def __init__(self, body, norm=True):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(H, 2 * H), torch.nn.Linear(2 * H, H)
        self.norm = torch.nn.LayerNorm(H)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)
        self.scale = torch.nn.Parameter(torch.rand(H) + 0.5)
        self.body = body

    def forward(self, x, y=None):
        return self.body(self, x) if y is None else self.body(self, x, y)


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


BODIES = {
    # post-LN residual: LN(x + down(...)) — the down-projection's bias moves into the region
    "skip_layer_norm": lambda m, x: m.norm(x + m.down(F.gelu(m.up(x)))),
    # pre-LN: the sum is both normed and carried on (a second output of the region)
    "skip_layer_norm_sum": lambda m, x: (lambda h: h + m.norm(h))(x + m.down(m.up(x))),
    "rms_norm": lambda m, x: rms(x, m.scale),
    "skip_rms_norm": lambda m, x, y: (lambda h: h * 2 + rms(h, m.scale))(x + y),
    "linear_gelu": lambda m, x: m.down(F.gelu(m.up(x))),
    "linear_gelu_tanh_residual": lambda m, x: F.gelu(m.down(m.up(x)), approximate="tanh") + x,
    "softmax": lambda m, x: (x * 0.5 + 1.0).softmax(-1) * 3.0,
    "hand_layer_norm": lambda m, x: (x - x.mean(-1, keepdim=True)) / torch.sqrt(
        x.var(-1, keepdim=True, unbiased=False) + 1e-5) * m.scale,
    "loop": lambda m, x: torch.sigmoid(x * 3.0 - 1.0) * torch.tanh(x),
}
EXPECTED = {  # pattern -> fused regions of each kind the body must produce
    "skip_layer_norm": {"skip_layer_norm": 1, "linear_gelu": 1},
    "skip_layer_norm_sum": {"skip_layer_norm": 1},
    "rms_norm": {"rms_norm": 1},
    "skip_rms_norm": {"skip_rms_norm": 1, "loop": 1},  # and h * 2 + norm(h) after it
    "linear_gelu": {"linear_gelu": 1},
    "linear_gelu_tanh_residual": {"linear_gelu_tanh_residual": 1},
    "softmax": {"softmax": 1},
    "hand_layer_norm": {"mean_var": 1},
    "loop": {"loop": 1},
}


def inputs(name, batch=2, seq=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, H, generator=gen)
    return (x, torch.randn(batch, seq, H, generator=gen)) if name == "skip_rms_norm" else (x,)


def compile_body(name, backend="eager", passes=None):
    model = Block(BODIES[name]).eval()
    example = inputs(name)
    dims = tuple({0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=32)} for _ in example)
    return model, blade.compile(model, example, dynamic_shapes=dims, backend=backend, passes=passes)


def regions(cm) -> Counter:
    return Counter(n.target.pattern for n in cm.graph.call_nodes if is_fused(n))


def check_fresh(model, cm, name, tol=1e-5):
    for seed, (batch, seq) in enumerate([(3, 7), (1, 2), (8, 32)], start=1):
        fresh = inputs(name, batch, seq, seed)
        with torch.no_grad():
            assert_matches(cm(*fresh), model(*fresh), tol=tol)


@pytest.mark.parametrize("name", list(BODIES))
def test_each_pattern_becomes_its_fused_op(name):
    model, cm = compile_body(name)
    assert dict(regions(cm)) == EXPECTED[name], str(cm.graph)
    for node in cm.graph.call_nodes:
        if is_fused(node):
            region = node.target
            assert region.kind in ("loop", "reduction", "matmul_epilogue")
            assert len(region.body.inputs) == len(node.args) and region.body.call_nodes
    check_fresh(model, cm, name)


@pytest.mark.parametrize("name", list(BODIES))
def test_numbers_match_eager_on_onnxruntime(name):
    model, cm = compile_body(name, backend="onnxruntime")
    assert cm.report.backend == "onnxruntime" and cm.executable.describe()["nodes"]["torch"] == 0
    check_fresh(model, cm, name)


def test_kinds_and_attrs_say_what_a_code_generator_needs():
    _, cm = compile_body("skip_layer_norm")
    by_pattern = {n.target.pattern: n for n in cm.graph.call_nodes if is_fused(n)}
    norm, epilogue = by_pattern["skip_layer_norm"].target, by_pattern["linear_gelu"].target
    assert norm.kind == "reduction" and norm.attrs["eps"] == 1e-5
    roles = recognise(norm).inputs  # as ONNX Runtime's SkipLayerNormalization reads them
    assert {r for r, node in roles.items() if node is not None} == {"input", "skip", "gamma", "beta", "bias"}
    assert [n.target for n in norm.body.call_nodes] == [aten.add.Tensor, aten.add.Tensor, aten.layer_norm.default]
    assert epilogue.kind == "matmul_epilogue" and epilogue.attrs["activation"] == "gelu"
    assert [n.target for n in epilogue.body.call_nodes] == [aten.linear.default, aten.gelu.default]
    linears = [n for n in cm.graph.call_nodes if n.target == aten.linear.default]
    assert len(linears) == 1 and len(linears[0].args) == 2  # the down-projection, its bias gone to the norm


def test_a_sum_read_on_becomes_a_second_output():
    _, cm = compile_body("skip_layer_norm_sum")
    (node,) = [n for n in cm.graph.call_nodes if is_fused(n)]
    assert recognise(node.target).outputs == ["sum", "out"] and isinstance(node.val, tuple)


def test_onnxruntime_gets_its_fused_contrib_ops(tmp_path):
    """On CPU: RMSNorm and bias + GELU as contrib ops; residual + layer norm as plain Add + Add +
    LayerNormalization, which bench/ort_fused_ops.py measured 2.7-5x faster than SkipLayerNormalization."""
    wanted = {"skip_layer_norm": {"BiasGelu": 1, "LayerNormalization": 1, "SkipLayerNormalization": 0},
              "rms_norm": {"SimplifiedLayerNormalization": 1},
              "skip_rms_norm": {"SkipSimplifiedLayerNormalization": 1},
              "linear_gelu_tanh_residual": {"FastGelu": 1, "Gelu": 0}}
    for name, ops in wanted.items():
        _, cm = compile_body(name, backend="onnxruntime")
        cm.executable.to_onnx(tmp_path / f"{name}.onnx")
        types = Counter(n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node)
        assert all(types[op] == count for op, count in ops.items()), (name, types)


def test_onnxruntime_does_not_fuse_back_what_blade_left_plain(tmp_path):
    from blade.backends.onnxruntime.session import OPTIMIZED_MODEL, OrtRunner

    _, cm = compile_body("skip_layer_norm_sum", backend="onnxruntime")
    (step,) = [s for s in cm.executable.steps if s.file]
    OrtRunner(str(cm.executable.workdir / step.file), cm.executable.steps[0].runner.target, step.region.inputs,
              step.region.outputs, profile_dir=str(tmp_path))
    types = Counter(n.op_type for n in onnx.load(str(tmp_path / OPTIMIZED_MODEL), load_external_data=False).graph.node)
    assert types["LayerNormalization"] == 1 and types["SkipLayerNormalization"] == 0, types


def test_a_value_read_twice_is_not_computed_twice():
    """x * 2 feeds two chains: fusing it into both would duplicate it, so it stays outside both."""
    model = Apply(lambda x: (lambda t: torch.exp(t) + 1.0 + torch.sin(t) * 2.0)(x * 2.0)).eval()
    x = torch.randn(4, H)
    cm = blade.compile(model, (x,), backend="eager")
    ops = Counter(n.target for n in cm.graph.call_nodes)
    inside = Counter(m.target for n in cm.graph.call_nodes if is_fused(n) for m in n.target.body.call_nodes)
    assert ops[aten.mul.Tensor] + inside[aten.mul.Tensor] == 2  # x * 2 once, the sin product once
    assert_matches(cm(x), model(x))


def test_graphs_without_a_pattern_are_unchanged():
    model = Apply(lambda x, y: x @ y).eval()
    cm = blade.compile(model, (torch.randn(4, 8), torch.randn(8, 3)), passes=[cleanup.run, *FUSION])
    fusion = [r for r in cm.report.passes if r["name"].startswith("fuse_")]
    assert len(fusion) == 3 and all(r["nodes_after"] == r["nodes_before"] and not r["counts"] for r in fusion)
    assert not any(is_fused(n) for n in cm.graph.call_nodes)


def test_fusion_never_creates_a_cycle():
    """a → b → c and a → c: fusing {a, c} without b would make b both read and feed the region."""
    model = Apply(lambda x: (lambda a: a + torch.tanh(a).sum(-1, keepdim=True).expand_as(a))(torch.exp(x))).eval()
    cm = blade.compile(model, (torch.randn(3, 4),), passes=[cleanup.run])
    graph = cm.graph.copy()
    exp = next(n for n in graph.call_nodes if n.target == aten.exp.default)
    add = next(n for n in graph.call_nodes if n.target == aten.add.Tensor)
    assert creates_cycle(graph, {exp, add})
    assert not creates_cycle(graph, set(graph.call_nodes))
    with pytest.raises(GraphError, match="cannot fuse .* it would create a cycle"):
        fuse(graph, [exp, add], "loop", "loop")


def test_fused_graph_saves_and_loads(tmp_path):
    model, cm = compile_body("skip_layer_norm_sum")
    cm.save(tmp_path / "m.blade")
    loaded = blade.load(tmp_path / "m.blade")
    fused = [n for n in loaded.graph.call_nodes if is_fused(n)]
    assert len(fused) == 1 and isinstance(fused[0].target, FusedRegion)
    assert fused[0].target.attrs == [n for n in cm.graph.call_nodes if is_fused(n)][0].target.attrs
    check_fresh(model, loaded, "skip_layer_norm_sum")


def test_report_counts_what_was_fused():
    _, cm = compile_body("skip_layer_norm")
    records = {r["name"]: r for r in cm.report.passes}
    norms, epilogues = records["fuse_norms"], records["fuse_epilogues"]
    assert norms["counts"] == {"reduction:skip_layer_norm": 1, "regions": 1, "ops_in_regions": 3}
    assert epilogues["counts"] == {"matmul_epilogue:linear_gelu": 1, "regions": 1, "ops_in_regions": 2}
    assert not records["fuse_loops"]["counts"]
    assert all(r["nodes_after"] < r["nodes_before"] for r in (norms, epilogues))


@pytest.mark.parametrize("spelling", [
    lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    lambda x: x * (0.5 + 0.5 * torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))])
def test_hand_written_gelu_becomes_gelu_tanh_and_fuses_into_the_matmul(spelling):
    lin = torch.nn.Linear(H, H).eval()
    model = Apply(lambda x: spelling(lin(x))).eval()
    x = torch.randn(2, 5, H)
    cm = blade.compile(model, (x,), backend="eager")
    assert [r for r in cm.report.passes if r["name"] == "activations"][0]["counts"] == {"activation:gelu_tanh": 1}
    assert dict(regions(cm)) == {"linear_gelu_tanh": 1}
    for seed in (1, 2):
        fresh = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(seed))
        assert_matches(cm(fresh), model(fresh), tol=1e-6)


def test_expressions_that_are_not_an_activation_stay_as_written():
    model = Apply(lambda x: 0.5 * x * (1.0 + torch.tanh(0.8 * (x + 0.044715 * x ** 3)))).eval()  # wrong constant
    cm = blade.compile(model, (torch.randn(4, H),), passes=[cleanup.run, activations.run])
    assert not [r for r in cm.report.passes if r["name"] == "activations"][0]["counts"]
    assert aten.tanh.default in {n.target for n in cm.graph.call_nodes}


def test_silu_written_out_becomes_silu():
    model = Apply(lambda x: x * torch.sigmoid(x) + 1.0).eval()
    x = torch.randn(4, H)
    cm = blade.compile(model, (x,), passes=[cleanup.run, activations.run])
    assert aten.silu.default in {n.target for n in cm.graph.call_nodes}
    assert_matches(cm(x), model(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["bert", "gpt", "vit", "dit", "mlp"])
def test_fused_zoo_models_match_eager_on_cuda(name):
    import blade.models as zoo

    from helpers import fresh_dims

    model, example, dims = zoo.get(name)
    model = model.cuda()
    cm = blade.compile(model, tuple(t.cuda() for t in example), dynamic_shapes=dims, backend="eager")
    assert any(is_fused(n) for n in cm.graph.call_nodes)
    fresh = tuple(t.cuda() for t in zoo.sample_inputs(name, seed=5, **fresh_dims(name)))
    with torch.no_grad():
        assert_matches(cm(*fresh), model(*fresh), tol=1e-4)


def test_debug_mode_checks_every_region_body():
    """A pass that leaves a fused node whose arguments do not match its body is caught by name."""
    def break_a_region(graph, ctx):
        node = next(n for n in graph.call_nodes if is_fused(n))
        graph.set_args(node, node.args[:-1])
        return graph

    model = Block(BODIES["loop"]).eval()
    with pytest.raises(GraphError, match="after pass break_a_region: fused node fused_loop: 0 arguments"):
        blade.compile(model, inputs("loop"), passes=[cleanup.run, *FUSION, break_a_region], debug=True)


# -- found in review ------------------------------------------------------------------------------

class SkipRms(torch.nn.Module):
    def __init__(self, skip_shape, weight_shape=(H,)):
        super().__init__()
        torch.manual_seed(0)
        self.p = torch.nn.Parameter(torch.randn(*skip_shape))
        self.w = torch.nn.Parameter(torch.rand(*weight_shape) + 0.5)

    def forward(self, x):
        return rms(x + self.p, self.w)


@pytest.mark.parametrize("x_shape, skip_shape, weight_shape", [
    ((6, H), (1, H), (H,)),  # 2-D input: ONNX Runtime wants the skip's exact shape
    ((2, 5, H), (1, 1, H), (H,)),
    ((2, 5, H), (5, H), (H,)),
    ((2, 5, H), (2, 5, H), (1,)),  # a weight of one element: ONNX Runtime wants [H]
])
def test_skip_norms_onnxruntime_cannot_take_run_as_plain_onnx(x_shape, skip_shape, weight_shape):
    model = SkipRms(skip_shape, weight_shape).eval()
    x = torch.randn(*x_shape)
    cm = blade.compile(model, (x,), backend="onnxruntime")
    assert regions(cm)["skip_rms_norm"] == 1
    fresh = torch.randn(*x_shape)
    assert_matches(cm(fresh), model(fresh), tol=1e-5)


def test_a_residual_of_a_value_with_itself_keeps_its_bias_twice():
    """LN(h + h) with h = linear(x): moving the bias into the region would add it once, not twice."""
    class Doubled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin, self.norm = torch.nn.Linear(H, H), torch.nn.LayerNorm(H)
            with torch.no_grad():
                self.lin.bias.uniform_(1, 2)

        def forward(self, x):
            h = self.lin(x)
            return self.norm(h + h)

    model = Doubled().eval()
    x = torch.randn(2, 5, H)
    for backend in ("eager", "onnxruntime"):
        cm = blade.compile(model, (x,), backend=backend)
        (node,) = [n for n in cm.graph.call_nodes if is_fused(n)]
        assert recognise(node.target).inputs["bias"] is None
        assert_matches(cm(x), model(x), tol=1e-5)


def test_the_listing_shows_each_region_kind_pattern_and_ops():
    _, cm = compile_body("skip_layer_norm")
    text = str(cm.graph)
    assert "fused.reduction.skip_layer_norm[add+add+layer_norm](" in text
    assert "fused.matmul_epilogue.linear_gelu[linear+gelu](" in text
