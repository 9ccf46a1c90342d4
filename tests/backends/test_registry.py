"""Backend registry and backend="auto"; the eager backend runs the IR through PyTorch."""
from __future__ import annotations

import pytest
import torch

from blade import backends
from blade.backends.base import Backend, Executable
from blade.backends.eager import EagerBackend
from blade.errors import BackendError, ConfigError
from blade.ir.graph import Graph, TensorMeta
from blade.target import Target, detect

CPU = Target("cpu", "test cpu", "x86_64")


class FakeGpuOnly(Backend):
    """A backend that exists but cannot run on a CPU target."""

    name = "onnxruntime"

    def available(self, target):
        return target.device == "cuda"

    def supports(self, node):
        return True

    def compile(self, graph, target):
        raise AssertionError("not reached")

    def load(self, directory, graph, target):
        raise AssertionError("not reached")


def test_auto_picks_onnxruntime_on_a_cpu():
    backend, reason = backends.resolve("auto", CPU)
    assert backend.name == "onnxruntime"
    assert "triton unavailable on cpu" in reason  # auto never picks the interpreter


def test_auto_skips_unavailable_backends(monkeypatch):
    monkeypatch.setitem(backends.base._REGISTRY, "onnxruntime", FakeGpuOnly())
    backend, reason = backends.resolve("auto", CPU)
    assert backend.name == "eager" and "onnxruntime unavailable on cpu" in reason
    with pytest.raises(ConfigError, match="backend 'onnxruntime' cannot run on cpu test cpu"):
        backends.resolve("onnxruntime", CPU)
    gpu = Target("cuda", "NVIDIA H100", "sm_90")
    assert backends.resolve("auto", gpu)[0].name == "triton"  # the default on a CUDA GPU
    monkeypatch.delitem(backends.base._REGISTRY, "triton")
    assert backends.resolve("auto", gpu)[0].name == "onnxruntime"


def test_unknown_backend():
    with pytest.raises(ConfigError, match="unknown backend 'nope'"):
        backends.get("nope")
    with pytest.raises(TypeError, match="does not implement the Backend interface"):
        backends.register(object())


def test_every_registered_backend_implements_the_interface():
    for name in backends.names():
        backend = backends.get(name)
        assert isinstance(backend, Backend) and backend.name == name
        assert backend.refuses(Graph("empty"), CPU) is None or isinstance(backend.refuses(Graph("empty"), CPU), str)


def test_an_executables_missing_capabilities_say_which_backend():
    graph = Graph("g")
    meta = TensorMeta((3,), torch.float32)
    graph.outputs = [graph.add_input("x", meta)]

    class Bare(Executable):
        backend = "bare"

        def __call__(self, *tensors):
            return list(tensors)

        def save(self, directory):
            pass

    bare = Bare()
    assert bare.describe() == {} and bare.requires() == {} and bare.sources() is None
    assert not bare.has_profiler() and not bare.exports_onnx()
    with pytest.raises(BackendError, match="backend 'bare' has no profiler"):
        bare.profile([torch.randn(3)], 0, 1)
    with pytest.raises(BackendError, match="backend 'bare' does not lower to ONNX"):
        bare.to_onnx("x.onnx")
    eager = EagerBackend().compile(graph, detect())
    assert isinstance(eager, Executable) and eager.has_profiler() and not eager.exports_onnx()


def test_eager_runs_a_hand_built_graph():
    graph = Graph("g")
    meta = TensorMeta((3,), torch.float32)
    x = graph.add_input("x", meta)
    graph.outputs = [graph.add_node(torch.ops.aten.sigmoid.default, (x,), meta={"val": meta})]
    executable = EagerBackend().compile(graph, detect())
    t = torch.randn(3)
    (out,) = executable(t)
    assert torch.equal(out, torch.sigmoid(t))


def test_detect_describes_this_cpu():
    target = detect()
    assert target.device == "cpu" and target.cores >= 1
    assert Target.from_dict(target.as_dict()) == target
