"""The float64 referee: an fp32 model that amplifies rounding beyond the tolerance (subnormal outputs), or a bf16
model whose outputs hold bf16's accuracy, compiles when blade is no further from the exact answer than eager itself,
and a wrong rewrite is still caught."""
import math

import torch

import blade
from blade.perf.accuracy import Judge, OutputError, exact_outputs, relative_error
from blade.frontend.capture import capture

aten = torch.ops.aten
X = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))


class Tiny(torch.nn.Module):
    """Outputs of about 1e-44, where fp32 keeps two or three bits: eager is 4e-2 from the float64 answer."""

    def forward(self, x):
        return (x * 1e-22) * 1e-22


def merge_scales(factor: float = 1.0):
    """(x * a) * b -> x * (a * b * factor): an exact rewrite for factor 1, rounded differently near underflow."""
    def merge_scales(graph, ctx):
        for node in graph.call_nodes:
            inner = node.args[0] if node.target is aten.mul.Tensor else None
            if getattr(inner, "target", None) is aten.mul.Tensor and ctx.allows(node.name):
                scale = inner.args[1] * node.args[1] * factor
                merged = graph.add_node(aten.mul.Tensor, (inner.args[0], scale), meta=dict(node.meta), name="merged")
                graph.replace_all_uses(node, merged)
                graph.remove_node(node)
                graph.remove_node(inner)
        return graph
    return merge_scales


def test_a_reordered_computation_as_close_to_the_exact_answer_as_eager_passes():
    compiled = blade.compile(Tiny(), (X,), backend="eager", passes=[merge_scales()])
    accuracy = compiled.report.accuracy
    (output,) = accuracy.outputs
    assert output.rel_err > 1e-2, "fp32 cannot hold 1e-5 here: the two differ by rounding alone"
    assert accuracy.ok and output.refereed and compiled.report.bisection == {}
    assert output.exact_rel_err <= 2 * output.eager_exact_rel_err
    assert "aten.mul.Tensor" in compiled.graph.count_targets() and len(compiled.graph.call_nodes) == 1
    assert any("from the float64 answer" in w for w in compiled.report.warnings)
    assert "ok against the float64 answer" in str(compiled.report)


def test_a_wrong_rewrite_is_still_caught_and_held_back():
    compiled = blade.compile(Tiny(), (X,), backend="eager", passes=[merge_scales(factor=3.0)])
    assert compiled.report.bisection["culprits"][0]["pass"] == "merge_scales"
    torch.testing.assert_close(compiled(X), Tiny()(X), rtol=0, atol=0)


def test_exact_outputs_promote_weights_inputs_and_dtype_arguments():
    class Cast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return (x @ self.w).to(torch.float32) + torch.ones(8, dtype=torch.float32)

    captured = capture(Cast(), (torch.randn(2, 8),))
    (out,) = exact_outputs(captured.graph, [torch.randn(2, 8)])
    assert out.dtype == torch.float64


class Bf16Scaled(torch.nn.Module):
    """A bf16 model with an fp32 output (as an LM's logits): the output holds bf16's accuracy, not fp32's 1e-5."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(4)).bfloat16())

    def forward(self, x):
        return ((x @ self.w) * 3.7 * 1.3).float()


def test_a_bf16_models_exact_answer_is_its_weights_in_float64():
    captured = capture(Bf16Scaled(), (X.bfloat16(),))
    (out,) = exact_outputs(captured.graph, [X.bfloat16()])
    assert out.dtype == torch.float64
    want = (X.bfloat16().double() @ Bf16Scaled().w.double()) * 3.7 * 1.3
    assert relative_error(out, want) < 1e-12


def test_a_bf16_model_keeps_a_rewrite_that_rounds_differently_and_loses_a_wrong_one():
    model, x = Bf16Scaled().eval(), X.bfloat16()
    compiled = blade.compile(model, (x,), backend="eager", passes=[merge_scales()])
    (output,) = compiled.report.accuracy.outputs
    assert output.rel_err > 1e-5, "one rounding of bf16 instead of two: more than fp32's tolerance apart"
    assert output.ok and output.refereed and compiled.report.bisection == {}
    assert output.exact_rel_err <= 2 * output.eager_exact_rel_err
    assert len(compiled.graph.call_nodes) < len(capture(model, (x,)).graph.call_nodes)
    wrong = blade.compile(model, (x,), backend="eager", passes=[merge_scales(factor=1.05)])
    assert wrong.report.bisection["culprits"][0]["pass"] == "merge_scales"
    torch.testing.assert_close(wrong(x), model(x), rtol=0, atol=0)


def test_nan_and_lowered_tolerances_are_never_refereed():
    nan = OutputError(0, "float32", math.nan, math.nan, math.nan, 1e-5, exact_rel_err=math.nan,
                      eager_exact_rel_err=1.0)
    assert not nan.ok
    ref = [torch.ones(4)]
    judge = Judge(ref, tolerance=1e-2, exact=lambda: [torch.ones(4, dtype=torch.float64)])
    assert not judge([torch.full((4,), 2.0)]).ok and judge.exact() is not None
    assert judge([torch.full((4,), 2.0)]).outputs[0].exact_rel_err is None, "a lowered compile keeps its budget"
    assert relative_error(torch.ones(4), torch.ones(4)) == 0.0


# ---------------------------------------------------------------- the cast-model referee of a low-precision compile

class DeepLinear(torch.nn.Module):
    """40 orthogonal 64-wide linears: in bf16 the rounding of every layer adds up past bf16's 1e-2 tolerance."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(40))
        for layer in self.layers:
            torch.nn.init.orthogonal_(layer.weight)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_bf16_compile_as_accurate_as_the_model_cast_to_bf16_passes_and_says_so():
    model, x = DeepLinear().eval(), torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    compiled = blade.compile(model, (x,), precision="bf16", backend="eager")
    (output,) = compiled.report.accuracy.outputs
    assert output.rel_err > output.tolerance == 1e-2, "the model cannot hold 1e-2 in bf16"
    assert output.ok and output.refereed and output.rel_err <= output.cast_rel_err
    assert "no less accurate than the cast model" in " ".join(compiled.report.warnings)
    assert "model cast to its precision" in str(compiled.report)


def test_a_user_budget_is_held_as_given():
    """accuracy_budget is the user's: no cast referee lifts it (the guard keeps layers in fp32 instead)."""
    model, x = DeepLinear().eval(), torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    compiled = blade.compile(model, (x,), precision="bf16", backend="eager", accuracy_budget=1e-2)
    assert compiled.report.accuracy.rel_err <= 1e-2 and compiled.report.quantization["kept_high_precision"]


def test_worse_than_the_cast_model_still_fails_and_nan_never_passes():
    ref = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    cast = ref + 0.03 * noise  # the cast model: 3e-2 off
    judge = Judge([ref], tolerance=1e-2, cast=lambda: [cast.bfloat16()])
    assert judge([ref + 0.02 * noise]).ok
    assert not judge([ref + 0.05 * noise]).ok
    assert not judge([torch.full_like(ref, math.nan)]).ok
    overflowed = Judge([ref], tolerance=1e-2, cast=lambda: [torch.full_like(ref, math.inf)])
    assert not overflowed([ref + 0.05 * noise]).ok, "a cast model that overflows sets no bar"
