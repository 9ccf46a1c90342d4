"""Quantization and mixed precision end to end: every zoo model, every mode, eager and ONNX Runtime
against fp32 on fresh inputs; the accuracy guard; saved artifacts; the report."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.utils._pytree as pytree

import blade
from blade import models
from blade.errors import AccuracyError
from blade.ops.quantized import QLINEAR

MODES = [{"precision": "fp16"}, {"precision": "bf16"}, {"quantize": "int8_weight_only"},
         {"quantize": "int8_dynamic"}, {"quantize": "int8_static"}, {"quantize": "fp8"}]


def mode_id(options: dict) -> str:
    return next(iter(options.values()))


def flat(out) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in pytree.tree_leaves(out) if t.is_floating_point()])


def rel_and_cosine(out, ref) -> tuple[float, float]:
    out, ref = flat(out), flat(ref)
    rel = float((out - ref).norm() / ref.norm())
    return rel, float(out @ ref / (out.norm() * ref.norm()))


def options_for(name: str, options: dict) -> dict:
    if options.get("quantize") == "int8_static":
        return dict(options, calibration_data=[models.sample_inputs(name, seed=10 + s) for s in range(3)])
    return options


def check_bounds(options: dict, rel: float, cos: float) -> None:
    assert not math.isnan(rel)
    if "precision" in options:
        assert rel <= 1e-2, f"{options}: relative error {rel:.3g} > 1e-2"
    else:
        assert cos >= 0.99, f"{options}: cosine {cos:.5f} < 0.99 (relative error {rel:.3g})"


@pytest.mark.parametrize("backend", ["eager", "onnxruntime", "triton"])
@pytest.mark.parametrize("options", MODES, ids=mode_id)
@pytest.mark.parametrize("name", models.names())
def test_zoo_model_in_every_mode(name, options, backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors take the Triton backend only under its interpreter (tests/conftest.py sets it "
                    "on machines without CUDA)")
    model, example, dims = models.get(name)
    cm = blade.compile(model, example, dynamic_shapes=dims, backend=backend, **options_for(name, options))
    fresh = models.sample_inputs(name, seed=99)
    with torch.no_grad():
        ref = model(*fresh)
    rel, cos = rel_and_cosine(cm(*fresh), ref)
    check_bounds(options, rel, cos)
    summary = cm.report.quantization
    assert summary["quantize"] == options.get("quantize") and summary["lowered"], summary
    if backend == "onnxruntime" and options.get("precision") != "bf16":  # ONNX Runtime has no bf16 matmul on CPU
        assert cm.report.backend_details["nodes"]["torch"] == 0, cm.report.backend_details
    if backend == "triton" and "quantize" in options:  # the int8/fp8 GEMM kernels ran, not the reference
        assert cm.report.backend_details["qgemm_nodes"] == len(
            [layer for layer in summary["lowered"] if layer["as"] != "int8_rows"]), cm.report.backend_details


class Outliers(torch.nn.Module):
    """Three linears; the middle one reads a channel 1000x larger than the rest while its output depends on the
    others: per-token int8 of its input rounds them to zero. The other two quantize well."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.middle, self.last = (torch.nn.Linear(16, 16), torch.nn.Linear(16, 16),
                                              torch.nn.Linear(16, 8))
        gain = torch.ones(16)
        gain[3] = 1000.0
        self.register_buffer("gain", gain)
        with torch.no_grad():
            self.middle.weight[:, 3] = 1e-6

    def forward(self, x):
        return self.last(torch.relu(self.middle(self.first(x) * self.gain)))


def outlier_inputs(seed: int):
    return (torch.randn(4, 16, generator=torch.Generator().manual_seed(seed)),)


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_guard_keeps_the_sensitive_layer_in_fp32_and_meets_the_budget(backend):
    model = Outliers().eval()
    unguarded = blade.compile(model, outlier_inputs(0), backend=backend, quantize="int8_dynamic")
    fresh = outlier_inputs(5)
    # without a budget the mode's tolerance (5e-2) still holds: the outlier layer breaks int8 (rel_err ~0.7), and
    # the accuracy bisection holds its quantization back
    assert unguarded.report.bisection["error_before"] > 0.1
    assert [(c["pass"], c["site"]) for c in unguarded.report.bisection["culprits"]] == [("quantize", "linear_1")]
    assert rel_and_cosine(unguarded(*fresh), model(*fresh))[0] <= 0.05
    cm = blade.compile(model, outlier_inputs(0), backend=backend, quantize="int8_dynamic", accuracy_budget=0.02,
                       calibration_data=[outlier_inputs(s) for s in (1, 2)])
    summary = cm.report.quantization
    assert summary["kept_high_precision"] == ["linear_1"]
    layers = {layer["name"]: layer for layer in summary["layers"]}
    assert layers["linear_1"]["error_alone"] > 10 * max(layers["linear"]["error_alone"], layers["linear_2"]["error_alone"])
    assert summary["error_eager"] <= 0.02 and summary["error_backend"] <= 0.02
    assert [layer["layer"] for layer in summary["lowered"]] == ["linear", "linear_2"]
    assert sum(n.target == QLINEAR for n in cm.graph.call_nodes) == 2
    assert rel_and_cosine(cm(*fresh), model(*fresh))[0] <= 0.02


class Spiky(torch.nn.Module):
    """Three 64-wide linears; the middle one has a weight 20x the rest in every row's first and second group of 32,
    on an input channel that is nearly zero: int4's group scale rounds the group's other weights to zero (0.69
    error), int8's row scale keeps them."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.first, self.middle, self.last = (torch.nn.Linear(64, 64), torch.nn.Linear(64, 64),
                                              torch.nn.Linear(64, 32))
        with torch.no_grad():
            for layer in (self.first, self.middle, self.last):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / 8)
            self.middle.weight[:, 0] = self.middle.weight[:, 32] = 2.5
        gain = torch.ones(64)
        gain[0] = gain[32] = 1e-3
        self.register_buffer("gain", gain)

    def forward(self, x):
        return self.last(torch.relu(self.middle(self.first(x) * self.gain)))


def test_int4_keeps_its_sensitive_layer_at_int8_not_fp32():
    model, example = Spiky().eval(), (torch.randn(4, 64, generator=torch.Generator().manual_seed(1)),)
    cm = blade.compile(model, example, backend="eager", quantize="int4_weight_only", accuracy_budget=0.2)
    summary = cm.report.quantization
    assert summary["error_all_lowered"] > 0.2 >= summary["error_eager"]
    assert summary["kept_high_precision"] == ["linear_1"]
    targets = cm.graph.count_targets()
    assert targets == {"blade.q4linear.default": 2, "blade.qlinear.default": 1, "aten.mul.Tensor": 1,
                       "aten.relu.default": 1}, targets
    (kept,) = [n for n in cm.graph.call_nodes if n.target == QLINEAR]
    assert kept.meta["layer"] == "linear_1" and kept.kwargs.get("mode", "weight_only") == "weight_only"
    fresh = (torch.randn(4, 64, generator=torch.Generator().manual_seed(7)),)
    assert rel_and_cosine(cm(*fresh), model(*fresh))[0] <= 0.2


def test_an_impossible_int4_budget_says_the_kept_layers_were_int8():
    model, example = Spiky().eval(), (torch.randn(4, 64, generator=torch.Generator().manual_seed(1)),)
    with pytest.raises(AccuracyError, match=r"cannot meet accuracy_budget=1e-09.*kept in int8 weight only") as info:
        blade.compile(model, example, backend="eager", quantize="int4_weight_only", accuracy_budget=1e-9)
    assert set(info.value.layers) == {"linear", "linear_1", "linear_2"}
    assert info.value.layers["linear_1"] == max(info.value.layers.values())


def test_an_impossible_budget_raises_with_the_per_layer_errors():
    with pytest.raises(AccuracyError, match=r"cannot meet accuracy_budget=1e-12.*linear_1 ") as info:
        blade.compile(Outliers().eval(), outlier_inputs(0), backend="eager", quantize="int8_dynamic",
                      accuracy_budget=1e-12)
    assert set(info.value.layers) == {"linear", "linear_1", "linear_2"}
    assert info.value.layers["linear_1"] == max(info.value.layers.values())


def test_the_guard_rechecks_on_the_backend_and_keeps_more_when_it_misses(monkeypatch):
    """A backend whose numbers are worse than the eager reference (here: forced) makes the guard keep more."""
    from blade.driver import lowering

    calls = []
    real = lowering.Lowering._backend_error

    def worse(self, executable, declared):
        calls.append(len(self.result.kept))
        return real(self, executable, declared) + (1.0 if len(self.result.kept) < 2 else 0.0)

    monkeypatch.setattr(lowering.Lowering, "_backend_error", worse)
    cm = blade.compile(Outliers().eval(), outlier_inputs(0), backend="eager", quantize="int8_dynamic",
                       accuracy_budget=0.02)
    assert calls == [1, 2] and len(cm.report.quantization["kept_high_precision"]) == 2


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
@pytest.mark.parametrize("mode", ["int8_dynamic", "fp8"])
def test_quantized_artifacts_load_and_match(tmp_path, backend, mode):
    model, example, dims = models.get("bert")
    cm = blade.compile(model, example, dynamic_shapes=dims, backend=backend, quantize=mode)
    cm.save(tmp_path / "q.blade")
    loaded = blade.load(tmp_path / "q.blade")
    fresh = models.sample_inputs("bert", seed=4)
    assert torch.equal(flat(loaded(*fresh)), flat(cm(*fresh)))
    assert loaded.report.quantization["quantize"] == mode
    assert any(t.dtype in (torch.int8, torch.float8_e4m3fn) for t in loaded.graph.constants.values())


def test_report_lists_every_lowered_layer_and_the_check_uses_the_mode_tolerance():
    model, example, dims = models.get("mlp")
    cm = blade.compile(model, example, dynamic_shapes=dims, backend="eager", quantize="int8_dynamic")
    summary = cm.report.quantization
    assert [layer["as"] for layer in summary["lowered"]] == ["dynamic"] * 3
    assert all(layer["source"] for layer in summary["lowered"])
    assert cm.report.accuracy.ok and cm.report.accuracy.outputs[0].tolerance == 5e-2
    assert not cm.report.warnings
    assert sorted(cm.report.matmul_precision.values()) == ["int8 dynamic"] * 3
    assert "matmuls   3 in int8 dynamic" in str(cm.report)
    mixed = blade.compile(model, example, dynamic_shapes=dims, backend="eager", precision="bf16")
    assert set(mixed.report.matmul_precision.values()) == {"bf16"}


def test_review_regressions_dtypes_pipelines_and_calibration_keys():
    """fp16 models keep fp16 outputs (fp16 tables stay unquantized), fp64 layers are left alone, a custom
    pipeline with fusion gets the lowering before it, calibration keyed by which input each tensor is."""
    from blade.runtime import cache
    from blade.passes import FUSION, cleanup

    class Emb(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.proj = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 8)

        def forward(self, ids):
            return self.proj(self.embed(ids))

    ids = torch.randint(0, 50, (2, 5))
    half = blade.compile(Emb().half(), (ids,), backend="eager", quantize="int8_dynamic")
    assert half(ids).dtype == torch.float16 and not half.report.warnings
    double = blade.compile(torch.nn.Linear(8, 8).double(), (torch.randn(3, 8, dtype=torch.float64),),
                           backend="eager", quantize="int8_dynamic")
    assert not double.report.quantization["lowered"]
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    custom = blade.compile(mlp, (torch.randn(3, 8),), backend="eager", passes=[cleanup.run, *FUSION],
                           quantize="int8_dynamic")
    assert len(custom.report.quantization["lowered"]) == 2
    a, b = torch.ones(2), torch.zeros(2)
    assert cache.tensors_digest([{"x": a, "y": b}]) != cache.tensors_digest([{"y": a, "x": b}])
    assert cache.tensors_digest([(a, None)]) != cache.tensors_digest([(None, a)])


def test_integer_outputs_of_a_lowered_model_are_reported_not_failed():
    class Classify(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(16, 10)

        def forward(self, x):
            logits = self.linear(x)
            return logits, logits.argmax(-1)

    cm = blade.compile(Classify(), (torch.randn(2000, 16),), backend="eager", quantize="int8_dynamic")
    assert cm.report.accuracy.ok and not cm.report.warnings
    assert cm.report.accuracy.outputs[1].rel_err > 0  # some argmax flipped, and that is reported


def test_static_layers_that_saw_only_zeros_stay_fp32_and_nan_calibration_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # the second linear reads only zeros after the ReLU
    cm = blade.compile(model, (torch.randn(2, 4),), backend="eager", quantize="int8_static",
                       calibration_data=[(torch.randn(2, 4),)])
    assert [layer["layer"] for layer in cm.report.quantization["lowered"]] == ["linear"]
    with pytest.raises(blade.errors.ConfigError, match="not finite"):
        blade.compile(model, (torch.randn(2, 4),), backend="eager", quantize="int8_static",
                      calibration_data=[(torch.full((2, 4), float("nan")),)])
