"""global_pool: an average pool over the whole input becomes a mean; any other pool is left alone."""
from __future__ import annotations

import pytest
import torch

import blade
from blade.passes import cleanup, global_pool
from blade.perf.accuracy import relative_error

aten = torch.ops.aten


class Pool(torch.nn.Module):
    def __init__(self, pool: torch.nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return self.pool(x * 2 + 1)


def _compile(model, x):
    return blade.compile(model, (x,), backend="eager", passes=[cleanup.run, global_pool.run])


def _counts(cm) -> int:
    (record,) = [r for r in cm.report.passes if r["name"] == "global_pool"]
    return record["counts"].get("global_average_pools", 0)


@pytest.mark.parametrize("pool, shape", [
    (torch.nn.AvgPool2d(1280, ceil_mode=True), (2, 6, 7, 7)),  # HF EfficientNet's pooler
    (torch.nn.AvgPool2d((5, 7)), (2, 6, 5, 7)),
    (torch.nn.AvgPool2d(9, ceil_mode=True, count_include_pad=False), (1, 3, 7, 9)),
    (torch.nn.AvgPool1d(16, ceil_mode=True), (2, 4, 11)),
    (torch.nn.AvgPool3d(4), (1, 2, 4, 4, 4)),
])
def test_a_pool_over_the_whole_input_becomes_a_mean_with_the_same_numbers(pool, shape):
    model, x = Pool(pool).eval(), torch.randn(*shape)
    cm = _compile(model, x)
    targets = [n.target for n in cm.graph.call_nodes]
    assert aten.mean.dim in targets and not any(t in global_pool.POOLS for t in targets)
    assert _counts(cm) == 1
    fresh = torch.randn(*shape)
    out, ref = cm(fresh), model(fresh)
    assert out.shape == ref.shape
    assert relative_error(out, ref) <= 1e-6


@pytest.mark.parametrize("pool, shape", [
    (torch.nn.AvgPool2d(3), (1, 2, 6, 6)),  # more than one window
    (torch.nn.AvgPool2d(8, padding=1, ceil_mode=True), (1, 2, 7, 7)),  # padding changes the divisor
    (torch.nn.AvgPool2d(7, divisor_override=3), (1, 2, 7, 7)),
    (torch.nn.AvgPool2d((7, 3)), (1, 2, 7, 7)),  # one window along H only
])
def test_any_other_pool_is_left_alone(pool, shape):
    model, x = Pool(pool).eval(), torch.randn(*shape)
    cm = _compile(model, x)
    assert any(n.target in global_pool.POOLS for n in cm.graph.call_nodes)
    assert _counts(cm) == 0
    fresh = torch.randn(*shape)
    assert relative_error(cm(fresh), model(fresh)) <= 1e-6


def test_a_symbolic_spatial_size_is_left_alone():
    model, x = Pool(torch.nn.AvgPool2d(64, ceil_mode=True)).eval(), torch.randn(1, 2, 7, 7)
    side = torch.export.Dim("side", min=2, max=64)
    cm = blade.compile(model, (x,), backend="eager", passes=[cleanup.run, global_pool.run],
                       dynamic_shapes=({2: side, 3: side},))
    assert any(n.target in global_pool.POOLS for n in cm.graph.call_nodes)
    fresh = torch.randn(1, 2, 12, 12)
    assert relative_error(cm(fresh), model(fresh)) <= 1e-6


def test_the_default_pipeline_runs_it():
    model, x = Pool(torch.nn.AvgPool2d(1280, ceil_mode=True)).eval(), torch.randn(1, 4, 7, 7)
    cm = blade.compile(model, (x,), backend="onnxruntime")
    assert _counts(cm) == 1
    fresh = torch.randn(1, 4, 7, 7)
    assert relative_error(cm(fresh), model(fresh)) <= 1e-5
