"""Backend registry and backend="auto"; the eager backend runs the IR through PyTorch."""
from __future__ import annotations

import pytest
import torch

from blade import backends
from blade.backends.eager import EagerBackend
from blade.errors import ConfigError
from blade.ir.graph import Graph, TensorMeta
from blade.target import Target, detect

CPU = Target("cpu", "test cpu", "x86_64")


class FakeGpuOnly:
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
