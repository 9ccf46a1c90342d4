"""Capture: sources (module, ExportedProgram, .pt2), output structures, eval mode, and its errors."""
from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch
from torch.export import Dim

import blade
from blade.errors import CaptureError, ConfigError, InputError

from helpers import assert_matches

Pair = namedtuple("Pair", ["first", "second"])


@dataclasses.dataclass
class Prediction:
    logits: torch.Tensor
    extras: dict


class Structured(torch.nn.Module):
    """Returns nested tuples, dicts, a namedtuple and a dataclass."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 6)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x, scale=None):
        y = self.drop(self.proj(x))
        if scale is not None:
            y = y * scale
        return {"pair": Pair(y, y.sum(-1)), "pred": Prediction(y.tanh(), {"max": y.amax(-1)}), "tuple": (y + 1,)}


def test_output_structures_are_kept():
    model = Structured()
    x, scale = torch.randn(3, 6), torch.randn(6)
    cm = blade.compile(model, (x,), example_kwargs={"scale": scale}, backend="eager")
    fresh_x, fresh_scale = torch.randn(3, 6), torch.randn(6)
    out = cm(fresh_x, scale=fresh_scale)
    assert isinstance(out["pair"], Pair) and isinstance(out["pred"], Prediction)
    assert_matches(out, model.eval()(fresh_x, scale=fresh_scale))
    assert_matches(cm(x=fresh_x, scale=fresh_scale), out, tol=0)  # same call, by name


def test_dropout_is_gone_and_training_flags_restored():
    model = Structured().train()
    cm = blade.compile(model, (torch.randn(3, 6),), backend="eager")
    assert model.training and model.drop.training, "compile must not leave the user's model in eval mode"
    targets = {str(n.target) for n in cm.graph.call_nodes}
    assert not any("dropout" in t for t in targets)
    out = cm(torch.ones(3, 6))
    assert not out["tuple"][0].requires_grad
    assert_matches(cm(torch.ones(3, 6)), out, tol=0)  # deterministic: no dropout at inference


class DictOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 6)

    def forward(self, x):
        y = self.proj(x)
        return {"y": y, "parts": (y.relu(), y.sum(0))}


def test_exported_program_and_pt2_sources(tmp_path):
    model = DictOut().eval()
    x = torch.randn(4, 6)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("rows", min=2, max=16)},))
    path = tmp_path / "structured.pt2"
    torch.export.save(ep, path)
    for source in (ep, str(path)):
        cm = blade.compile(source, (x,), backend="eager")
        fresh = torch.randn(7, 6)
        assert_matches(cm(fresh), ep.module()(fresh))
        assert cm.graph.dims["x_dim0"].max == 16  # a .pt2 carries no Dim names: named after the input


def test_missing_pt2_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        blade.compile(str(tmp_path / "nope.pt2"), (torch.randn(2),), backend="eager")


class Branchy(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x + 1
        return x - 1


def test_data_dependent_control_flow_is_a_capture_error():
    with pytest.raises(CaptureError) as info:
        blade.compile(Branchy(), (torch.randn(3),), backend="eager")
    message = str(info.value)
    assert "GuardOnDataDependentSymNode" in message  # torch's reason is kept
    assert "torch.where" in message and "hint:" in message


class FixesBatch(torch.nn.Module):
    def forward(self, x):
        return x.view(2, -1)


def test_specialized_dynamic_dim_is_a_capture_error():
    with pytest.raises(CaptureError, match="(?s)batch.*hint: a dim you declared dynamic is fixed"):
        blade.compile(FixesBatch(), (torch.randn(2, 3),), dynamic_shapes=({0: Dim("batch")},), backend="eager")


def test_malformed_dynamic_shapes_are_config_errors():
    model, x = Structured(), torch.randn(3, 6)
    with pytest.raises(ConfigError, match=r"dynamic_shapes names \['y'\].*inputs are \['x'\]"):
        blade.compile(model, (x,), dynamic_shapes={"y": {0: Dim("batch")}}, backend="eager")
    with pytest.raises(ConfigError, match="axis 5 is out of range for a 2-d input"):
        blade.compile(model, (x,), dynamic_shapes={"x": {5: Dim("batch")}}, backend="eager")
    with pytest.raises(ConfigError, match="must be a dict keyed by input name"):
        blade.compile(model, (x,), dynamic_shapes="batch", backend="eager")


def test_non_tensor_inputs_are_rejected():
    """bool/int/float/str inputs are specialised constants (tests/test_language.py); other objects are refused."""
    with pytest.raises(InputError, match=r"example input 'args\[1\]' is a object"):
        blade.compile(Structured(), (torch.randn(3, 6), object()), backend="eager")
    with pytest.raises(InputError, match="nn.Module"):
        blade.compile(lambda x: x + 1, (torch.randn(3),), backend="eager")


def test_unknown_backend_and_level_are_config_errors():
    with pytest.raises(ConfigError, match=r"unknown backend 'tensorrt'; registered backends: \['eager', 'inductor', 'inductor_step', 'onnxruntime', 'triton'\]"):
        blade.compile(Structured(), (torch.randn(3, 6),), backend="tensorrt")
    with pytest.raises(ConfigError, match="optimize=7 is not a level"):
        blade.compile(Structured(), (torch.randn(3, 6),), optimize=7, backend="eager")


class MutatesBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x):
        self.count.add_(1)
        return x + self.count


def test_state_mutation_compiles_as_state_the_compiled_model_owns():
    model, x = MutatesBuffer(), torch.randn(3)
    cm = blade.compile(model, (x,), backend="eager")
    assert cm.graph.mutations == ["b_count"] and torch.equal(model.count, torch.zeros(1))
    torch.testing.assert_close(cm(x), x + 1)
    torch.testing.assert_close(cm(x), x + 2)
    assert torch.equal(cm.state["count"], torch.full((1,), 2.0)) and torch.equal(model.count, torch.zeros(1))


def test_auto_dims_that_specialize_are_reported():
    model = FixesBatch()
    cm = blade.compile(model, (torch.randn(2, 3),), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},), backend="eager")
    assert any("axis 0" in text and "= 2" in text for text in cm.report.specialized), cm.report.specialized
    assert "specialized: x axis 0" in str(cm.report)
    assert cm.report.dims == ["x_dim1 in [2, inf]"]  # the dim torch kept dynamic, named after its input


def test_exported_program_options_and_training_mode(tmp_path):
    model, x = DictOut(), torch.randn(4, 6)
    ep = torch.export.export(model.eval(), (x,))
    with pytest.raises(ConfigError, match="dynamic_shapes cannot change an ExportedProgram"):
        blade.compile(ep, (x,), dynamic_shapes=({0: Dim("rows")},), backend="eager")
    trained = torch.export.export(Structured().train(), (x,))
    with pytest.raises(CaptureError, match="exported from a model in train mode.*model.eval"):
        blade.compile(trained, (x,), backend="eager")


class OptionalMiddle(torch.nn.Module):
    def forward(self, x, bias=None, scale=None):
        y = x if bias is None else x + bias
        return y * scale


def test_positional_none_means_absent():
    x, scale = torch.randn(3), torch.randn(3)
    cm = blade.compile(OptionalMiddle(), (x, None, scale), backend="eager")
    assert torch.equal(cm(x, None, scale), x * scale)
    assert torch.equal(cm(x, scale=scale), x * scale)


class Masked(torch.nn.Module):
    def forward(self, x):
        return x.masked_fill(x < 0, float("-inf")).softmax(-1), x.masked_fill(x > 0, float("inf"))


def test_infinite_outputs_are_accurate_when_they_match():
    x = torch.randn(4, 5)
    x[:, 0] = 1.0  # no row fully masked (its softmax would be NaN in eager, and NaN never passes)
    cm = blade.compile(Masked(), (x,), backend="eager")
    assert cm.report.accuracy.ok, cm.report


def test_a_low_precision_output_is_compared_by_value_and_other_dtype_changes_fail():
    from blade.perf.accuracy import compare_tensor

    ref, bf16 = torch.randn(64), torch.bfloat16
    lowered = compare_tensor(0, ref.to(bf16), ref, tolerance=1e-2, declared=bf16)
    assert lowered.ok and 0 < lowered.rel_err < 5e-3 and lowered.dtype == "bfloat16 (of float32)"
    assert not compare_tensor(0, ref.to(bf16) + 1, ref, tolerance=1e-2, declared=bf16).ok  # values still count
    # a low output the graph does not declare (a backend that dropped the cast back) fails, whatever the tolerance
    assert compare_tensor(0, ref.to(bf16), ref, tolerance=1e-2).rel_err == float("inf")
    assert compare_tensor(0, ref.to(torch.float16), ref, tolerance=1e-2, declared=bf16).rel_err == float("inf")
    widened = compare_tensor(0, ref.double(), ref.double().to(torch.float32))
    assert widened.rel_err == float("inf")  # only fp32 -> fp16/bf16 is a lowering
    assert compare_tensor(0, ref.to(torch.float16), ref.to(torch.bfloat16), tolerance=1).rel_err == float("inf")


def test_outputs_are_freed_as_soon_as_the_caller_drops_them():
    import gc
    import weakref

    cm = blade.compile(DictOut(), (torch.randn(4, 6),), backend="eager")
    gc.disable()  # a reference cycle would keep them until the collector runs
    try:
        out = cm(torch.randn(4, 6))
        alive = [weakref.ref(out["y"]), weakref.ref(out["parts"][0])]
        del out
        assert all(ref() is None for ref in alive)
    finally:
        gc.enable()
