"""backend="auto" by measurement: candidates compiled and timed, the fastest kept, every time reported."""
from __future__ import annotations

import time
import warnings

import pytest
import torch

import blade
from blade import backends
from blade.backends.eager import EagerBackend, EagerExecutable


class _Slow(EagerExecutable):
    def __call__(self, *tensors):
        time.sleep(0.004)
        return super().__call__(*tensors)


class SlowBackend(EagerBackend):
    """The eager backend, 4 ms slower per call: never the fastest."""

    name = "slow_for_tests"

    def compile(self, graph, target, example_inputs=None):
        return _Slow(graph)


@pytest.fixture
def slow_first(monkeypatch):
    """The slow backend registered and first in auto's preference: the fixed rule would pick it."""
    from blade.backends import base

    backends.register(SlowBackend())
    monkeypatch.setattr(base, "AUTO_PREFERENCE", ("slow_for_tests",) + base.AUTO_PREFERENCE)
    # inductor compiles for seconds per model: tests/backends/test_inductor.py measures it as a candidate
    monkeypatch.setattr(base, "MEASURED_CANDIDATES", ("slow_for_tests", "triton", "onnxruntime", "eager"))
    yield
    backends.unregister("slow_for_tests")


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).eval()


def test_a_slow_candidate_is_never_chosen_and_every_time_is_reported(slow_first):
    cm = blade.compile(mlp(), (torch.randn(4, 32),), autotune=True)
    candidates = cm.report.backend_candidates
    assert cm.backend != "slow_for_tests"
    assert {"slow_for_tests", "onnxruntime", "eager"} <= {n for n, c in candidates.items() if "ms" in c}
    assert candidates["slow_for_tests"]["ms"] > 4.0 > candidates[cm.backend]["ms"]
    assert candidates[cm.backend]["ms"] == min(c["ms"] for c in candidates.values() if "ms" in c)
    assert "unavailable on cpu" in candidates["triton"]["skipped"]
    assert cm.report.backend_reason.startswith(f"auto (measured): {cm.backend} ")
    assert "candidate slow_for_tests" in str(cm.report)


def test_autotune_off_follows_the_fixed_rule(slow_first):
    cm = blade.compile(mlp(), (torch.randn(4, 32),), autotune=False)
    assert cm.backend == "slow_for_tests" and not cm.report.backend_candidates


def test_a_named_backend_is_not_measured(slow_first):
    cm = blade.compile(mlp(), (torch.randn(4, 32),), backend="eager", autotune=True)
    assert cm.backend == "eager" and not cm.report.backend_candidates


def test_a_failing_candidate_is_reported_and_skipped(slow_first, monkeypatch):
    def broken(self, graph, target, example_inputs=None):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(SlowBackend, "compile", broken)
    cm = blade.compile(mlp(), (torch.randn(4, 32),), autotune=True)
    assert "no kernel for this" in cm.report.backend_candidates["slow_for_tests"]["error"]
    assert cm.backend in ("onnxruntime", "eager")


def test_bf16_graphs_skip_onnxruntime_on_cpu():
    cm = blade.compile(mlp(), (torch.randn(4, 32),), autotune=True, precision="bf16")
    assert "bf16" in cm.report.backend_candidates["onnxruntime"]["skipped"] and cm.backend in ("eager", "inductor")


def test_the_report_says_where_every_node_runs():
    from blade.ir.fused import calls_within
    from blade.models import get

    model, example, dynamic = get("gpt", "tiny")
    cm = blade.compile(model, example, dynamic_shapes=dynamic, backend="eager", precision="bf16", cache=False)
    nodes = cm.report.backend_details["nodes"]
    attention = next(k for k in nodes if k.startswith("attention: "))
    assert "fused bf16 CPU kernel" in attention and "blocked bf16 CPU kernel" in attention
    assert nodes[attention] == 2  # one per layer
    assert sum(nodes.values()) == len(calls_within(cm.graph))
    assert f"2 nodes on {attention}" in str(cm.report)


def test_bf16_on_a_cpu_without_it_compiles_fp32_with_one_warning(monkeypatch):
    import blade.api
    from blade.target import Target

    plain = Target("cpu", "old cpu", "x86_64", ("avx2", "fma"), 2)
    monkeypatch.setattr(blade.driver.pipeline, "detect", lambda device: plain)
    monkeypatch.setattr(blade.driver.pipeline, "_WARNED", set())
    with pytest.warns(UserWarning, match="no bf16 matmul instructions"):
        cm = blade.compile(mlp(), (torch.randn(4, 32),), backend="eager", precision="bf16")
    assert all(n.val.dtype == torch.float32 for n in cm.graph.call_nodes if hasattr(n.val, "dtype"))
    assert any("compiled in fp32" in w for w in cm.report.warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not per compile
        blade.compile(mlp(), (torch.randn(4, 32),), backend="eager", precision="bf16")


def test_the_choice_is_saved_and_cached(slow_first, tmp_path, monkeypatch):
    from blade.driver import selection

    monkeypatch.setenv("BLADE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BLADE_CACHE", "1")
    model, x = mlp(), torch.randn(4, 32)
    first = blade.compile(model, (x,), autotune=True)
    first.save(tmp_path / "m.blade")
    loaded = blade.load(tmp_path / "m.blade")
    assert loaded.backend == first.backend and loaded.report.backend_candidates == first.report.backend_candidates

    def measured_again(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(selection, "select", measured_again)
    again = blade.compile(model, (x,), autotune=True)
    assert again.report.cache["hit"] and again.backend == first.backend


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_cuda_measures_triton_and_keeps_the_fastest_in_bf16():
    from blade.models import get, sample_inputs

    model, example, dynamic = get("gpt", "tiny")
    model = model.cuda()
    example = tuple(t.cuda() for t in example)
    cm = blade.compile(model, example, dynamic_shapes=dynamic, autotune=True, precision="bf16", cache=False)
    measured = {n: c["ms"] for n, c in cm.report.backend_candidates.items() if "ms" in c}
    assert "triton" in measured, cm.report.backend_candidates
    assert measured[cm.backend] == min(measured.values())
    inputs = tuple(t.cuda() for t in sample_inputs("gpt", "tiny", batch=2, seq=24))
    with torch.no_grad():
        ref, out = model(*inputs), cm(*inputs)
    assert out.dtype == ref.dtype == torch.float32
    assert float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref)) <= 1e-2


class ConvNet(torch.nn.Module):
    """Conv + batch norm + ReLU, then a GELU head: blade's passes rewrite it (GELU epilogue), ONNX Runtime
    fuses the plain form itself."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.norm(self.conv(x))).mean((2, 3))
        return torch.nn.functional.gelu(self.head(y))


def _conv_net():
    torch.manual_seed(0)
    return ConvNet().eval()


MEASURED = ("triton", "onnxruntime", "eager")


def test_a_graph_with_convolutions_also_measures_onnxruntime_on_the_lightly_optimized_graph(monkeypatch):
    from blade.backends import base

    monkeypatch.setattr(base, "MEASURED_CANDIDATES", MEASURED)
    cm = blade.compile(_conv_net(), (torch.randn(2, 3, 16, 16),), autotune=True)
    candidates = cm.report.backend_candidates
    assert "ms" in candidates["onnxruntime"] and "ms" in candidates["onnxruntime (light)"]
    assert cm.report.accuracy.ok
    no_convs = blade.compile(mlp(), (torch.randn(4, 32),), autotune=True)
    assert "onnxruntime (light)" not in no_convs.report.backend_candidates  # nothing ORT would lay out itself


def test_when_the_light_graph_wins_it_is_the_compiled_graph_and_the_report_says_by_how_much(monkeypatch):
    from blade.backends import base
    from blade.driver import selection

    monkeypatch.setattr(base, "MEASURED_CANDIDATES", MEASURED)
    real = selection._time

    def light_wins(compiled, examples, device):
        times = real(compiled, examples, device)
        return {name: (1e-6 if name == "onnxruntime (light)" else 1.0) for name in times}

    monkeypatch.setattr(selection, "_time", light_wins)
    model, x = _conv_net(), torch.randn(2, 3, 16, 16)
    cm = blade.compile(model, (x,), autotune=True)
    assert cm.backend == "onnxruntime"
    assert "the lightly optimized graph won" in cm.report.backend_reason
    assert [p["name"] for p in cm.report.passes] == ["cleanup"]
    from blade.ir.fused import is_fused

    assert not any(is_fused(node) for node in cm.graph.call_nodes)
    fresh = torch.randn(2, 3, 16, 16)
    from blade.perf.accuracy import relative_error

    with torch.no_grad():
        assert relative_error(cm(fresh), model(fresh)) <= 1e-5


def test_lowered_precision_and_named_backends_get_no_light_candidate(monkeypatch):
    from blade.backends import base

    monkeypatch.setattr(base, "MEASURED_CANDIDATES", MEASURED)
    named = blade.compile(_conv_net(), (torch.randn(2, 3, 16, 16),), backend="onnxruntime")
    assert named.report.backend_candidates == {}
    quantized = blade.compile(_conv_net(), (torch.randn(2, 3, 16, 16),), autotune=True, quantize="int8_weight_only")
    assert "onnxruntime (light)" not in quantized.report.backend_candidates


def test_a_bf16_compile_also_measures_the_fp32_graph_on_onnxruntime_and_says_when_it_wins(monkeypatch):
    """Depthwise convolutions gain nothing from bf16 on CPU: there ONNX Runtime in fp32 can beat every bf16
    candidate, and the compile is then fp32 (more accurate than asked), with a warning."""
    import blade.target
    from blade.backends import base
    from blade.driver import selection

    if not blade.target.supports_bf16(blade.target.detect()):
        pytest.skip("this CPU compiles precision='bf16' in fp32 anyway")
    monkeypatch.setattr(base, "MEASURED_CANDIDATES", MEASURED)
    model, x = _conv_net(), torch.randn(2, 3, 16, 16)
    plain = blade.compile(model, (x,), autotune=True, precision="bf16")
    assert "ms" in plain.report.backend_candidates["onnxruntime (fp32)"]
    assert "onnxruntime" not in {n for n, c in plain.report.backend_candidates.items() if "ms" in c}
    real = selection._time
    monkeypatch.setattr(selection, "_time", lambda compiled, examples, device: {
        name: (1e-6 if name == "onnxruntime (fp32)" else 1.0) for name in real(compiled, examples, device)})
    cm = blade.compile(model, (x,), autotune=True, precision="bf16")
    assert cm.backend == "onnxruntime" and set(cm.report.matmul_precision.values()) == {"fp32"}
    assert any("compiled in fp32 on onnxruntime" in w for w in cm.report.warnings)
    out = cm(x)
    with torch.no_grad():
        assert out.dtype == torch.float32 and torch.allclose(out, model(x), rtol=1e-4, atol=1e-5)
    with_budget = blade.compile(model, (x,), autotune=True, precision="bf16", accuracy_budget=0.05)
    assert "onnxruntime (fp32)" not in with_budget.report.backend_candidates
