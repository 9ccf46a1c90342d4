"""horizontal: linears that read the same input become one wide matmul and a split."""
from __future__ import annotations

import pytest
import torch
from torch.export import Dim

import blade
from blade.passes import cleanup, horizontal

from helpers import assert_matches

aten = torch.ops.aten


class Projections(torch.nn.Module):
    def __init__(self, bias=True, kv=8, mixed=False):
        super().__init__()
        torch.manual_seed(0)
        self.q = torch.nn.Linear(16, 16, bias=bias)
        self.k = torch.nn.Linear(16, kv, bias=bias and not mixed)
        self.v = torch.nn.Linear(16, kv, bias=bias)
        self.other = torch.nn.Linear(16, 16)

    def forward(self, x, y):
        q, k, v = self.q(x), self.k(x), self.v(x)
        # a view that merges dims needs the parts dense: it must still work on the split's views
        merged = (q[..., :8] * k + v).view(-1)
        return merged, self.other(y)


def compile_with(model, backend="eager", passes=(cleanup.run, horizontal.run)):
    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    dims = ({1: Dim("seq", min=2, max=32)}, {1: Dim("seq", min=2, max=32)})
    return blade.compile(model, (x, y), dynamic_shapes=dims, backend=backend, passes=list(passes) if passes else None)


def fresh(seq=9, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, seq, 16, generator=gen), torch.randn(2, seq, 16, generator=gen)


@pytest.mark.parametrize("bias", [True, False])
def test_projections_of_one_input_become_one_matmul(bias):
    model = Projections(bias=bias).eval()
    cm = compile_with(model)
    linears = [n for n in cm.graph.call_nodes if n.target == aten.linear.default]
    assert len(linears) == 2  # q/k/v as one, `other` (another input) alone
    wide = next(n for n in linears if n.val.shape[-1] == 32)
    assert (len(wide.args) > 2 and wide.args[2] is not None) == bias
    assert aten.split_with_sizes.default in {n.target for n in cm.graph.call_nodes}
    assert_matches(cm(*fresh()), model(*fresh()))


def test_numbers_hold_on_onnxruntime():
    model = Projections().eval()
    cm = compile_with(model, backend="onnxruntime", passes=None)
    assert_matches(cm(*fresh(seq=4, seed=5)), model(*fresh(seq=4, seed=5)), tol=1e-5)


def test_mixed_bias_groups_are_left_alone():
    model = Projections(mixed=True).eval()
    cm = compile_with(model)
    (record,) = [r for r in cm.report.passes if r["name"] == "horizontal"]
    assert record["counts"]["linears_2_into_1"] == 1 and "linears_3_into_1" not in record["counts"]  # q, v
    assert sum(n.target == aten.linear.default for n in cm.graph.call_nodes) == 3
    assert_matches(cm(*fresh()), model(*fresh()))


@pytest.mark.parametrize("read", [
    lambda q, k: q[0].view(-1) + k[0].view(-1),  # select, then a view that merges dims
    lambda q, k: q[:, 1:].view(-1) + k[:, 1:].view(-1),
    lambda q, k: q.squeeze(0).view(-1) + k.squeeze(0).view(-1),
])
def test_views_reached_through_any_aliasing_op_still_work(read):
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q, self.k = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

        def forward(self, x):
            return read(self.q(x), self.k(x))

    model, x = Two().eval(), torch.randn(1, 5, 16)
    cm = blade.compile(model, (x,), backend="eager")
    assert [r for r in cm.report.passes if r["name"] == "horizontal"][0]["counts"]["linears_2_into_1"] == 1
    assert_matches(cm(x), model(x))
