"""cleanup: no-op removal, CSE and DCE — what it rewrites, that numbers hold, what it leaves alone."""
from __future__ import annotations

import torch

import blade
from blade.frontend.capture import capture
from blade.config import CompileConfig
from blade.passes import cleanup, run_pipeline

from helpers import assert_matches

aten = torch.ops.aten


class Cluttered(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x):
        y = self.drop(self.proj(x)).clone()
        y = y.view(y.shape) * 1 - 0
        y = y.to(torch.float32).transpose(1, 1).permute(0, 1, 2).contiguous()
        first, second = torch.tanh(y), torch.tanh(y)  # the same expression twice
        return first + second


def run_cleanup(model, *inputs):
    captured = capture(model, inputs)
    graph, (record,) = run_pipeline(captured.graph, [cleanup.run], CompileConfig(debug=True))
    return captured, graph, record


def targets(graph) -> list:
    return [n.target for n in graph.call_nodes]


def test_structure_noops_duplicates_and_dead_code_are_gone():
    captured, graph, record = run_cleanup(Cluttered(), torch.randn(2, 3, 8))
    before = targets(captured.graph)
    assert aten.clone.default in before and aten.tanh.default in before
    after = targets(graph)
    assert after.count(aten.tanh.default) == 1
    for gone in (aten.clone.default, aten.view.default, aten.mul.Tensor, aten.sub.Tensor, aten.transpose.int,
                 aten.permute.default, aten._to_copy.default):
        assert gone not in after, gone
    assert {"p_unused_weight", "p_unused_bias"}.isdisjoint(graph.constants)
    assert record.counts["cse_merged"] == 1 and record.counts["asserts_proven"] == 1
    assert record.counts["dead_constants"] == 2
    assert record.nodes_after < record.nodes_before
    assert [str(t) for t in after] == ["aten.linear.default", "aten.tanh.default", "aten.add.Tensor"]


def test_dead_code_left_by_an_edit_is_removed():
    captured = capture(Cluttered(), (torch.randn(2, 3, 8),))
    graph = captured.graph.copy()
    x = graph.inputs[0]
    dead = graph.add_node(aten.exp.default, (x,), meta={"val": x.val})
    graph.add_node(aten.neg.default, (dead,), meta={"val": x.val})
    graph, (record,) = run_pipeline(graph, [cleanup.run], CompileConfig(debug=True))
    assert aten.exp.default not in targets(graph) and aten.neg.default not in targets(graph)
    assert record.counts["dead_nodes"] == 2


def test_numbers_match_eager():
    model = Cluttered().eval()
    cm = blade.compile(model, (torch.randn(2, 3, 8),), backend="eager")
    x = torch.randn(2, 3, 8)
    assert_matches(cm(x), model(x))


class Clean(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x, y):
        return torch.relu(self.proj(x)) * 2 + y.view(-1, 4).sum(0), x.transpose(0, 1)


def test_leaves_a_clean_graph_unchanged():
    captured, graph, record = run_cleanup(Clean(), torch.randn(5, 8), torch.randn(2, 10, 4))
    assert str(graph) == str(captured.graph)
    assert not record.counts


class ReturnsCopies(torch.nn.Module):
    def forward(self, x):
        noise = torch.rand_like(x) + torch.rand_like(x)  # two draws, not one
        return x.clone(), noise


def test_keeps_output_copies_of_inputs_and_random_ops():
    captured, graph, _ = run_cleanup(ReturnsCopies(), torch.randn(4))
    after = targets(graph)
    assert aten.clone.default in after, "removing it would return the caller's own tensor"
    assert sum(str(t).startswith("aten.rand") for t in after) == 2
    x = torch.randn(4)
    out, _ = blade.compile(ReturnsCopies(), (x,), backend="eager")(x)
    assert out is not x and torch.equal(out, x)


class SelectClone(torch.nn.Module):
    def forward(self, x):
        return x[0].clone(), x.clone().view(x.shape)


class WeightCopy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3, 4))

    def forward(self, x):
        return x + 1, self.w.t().clone()


def test_outputs_never_alias_inputs_or_weights():
    x = torch.zeros(3, 4)
    first, second = blade.compile(SelectClone(), (x,), backend="eager")(x)
    first.add_(5)
    second.add_(5)
    assert x.abs().sum() == 0, "writing to an output changed the caller's input"
    model = WeightCopy()
    cm = blade.compile(model, (torch.zeros(2),), backend="eager")
    cm(torch.zeros(2))[1].mul_(0)
    assert model.w.sum() == 12 and cm(torch.zeros(2))[1].sum() == 12


class DensifyThenView(torch.nn.Module):
    def forward(self, x, y):
        return x.expand(4, 3).clone().view(-1) * 2, y[:, ::2].clone().view(-1) * 2


def test_copies_of_views_stay():
    x, y = torch.randn(1, 3), torch.randn(4, 6)
    cm = blade.compile(DensifyThenView(), (x, y), backend="eager")
    assert_matches(cm(x, y), DensifyThenView()(x, y))


class SignedZeros(torch.nn.Module):
    def forward(self, x):
        plus, minus = torch.full_like(x, 0.0), torch.full_like(x, -0.0)
        return x / minus, x / plus, 1 / (x + 0.0)


def test_signed_zeros_survive():
    x = torch.tensor([1.0, -0.0])
    cm = blade.compile(SignedZeros(), (x,), backend="eager")
    for got, want in zip(cm(x), SignedZeros()(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # +inf vs -inf would fail


class TwinOutputs(torch.nn.Module):
    def forward(self, x):
        y = torch.tanh(x)
        return torch.tanh(x), y, y.clone()


def test_distinct_outputs_stay_distinct_tensors():
    x = torch.randn(3)
    a, b, c = blade.compile(TwinOutputs(), (x,), backend="eager")(x)
    assert a.data_ptr() != b.data_ptr() and b.data_ptr() != c.data_ptr()
    assert torch.equal(a, b) and torch.equal(b, c)
