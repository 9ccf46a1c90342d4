"""fold: what is computed from weights alone becomes a constant; nothing that reads an input does."""
from __future__ import annotations

import torch

import blade
from blade.passes import cleanup, fold

from helpers import assert_matches

aten = torch.ops.aten


class WeightMath(torch.nn.Module):
    """Weights transposed, cast, scaled and concatenated at every call, and a buffer expanded large."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(16, 8))
        self.b = torch.nn.Parameter(torch.randn(16))
        self.register_buffer("row", torch.randn(1, 512))

    def forward(self, x):
        w = torch.cat([self.w.t() * 0.5, self.w.t().double().float()], 1)  # [8, 32] from weights alone
        big = self.row.expand(4096, 512)  # 8 MiB from 2 KiB: not worth a constant
        return x @ w + self.b.repeat(2) + big[: x.shape[0], :16].sum()


def compile_fold(model, x):
    return blade.compile(model, (x,), backend="eager", passes=[cleanup.run, fold.run])


def test_weight_only_arithmetic_is_folded_and_numbers_hold():
    model, x = WeightMath().eval(), torch.randn(4, 8)
    cm = compile_fold(model, x)
    (record,) = [r for r in cm.report.passes if r["name"] == "fold"]
    targets = {n.target for n in cm.graph.call_nodes}
    assert not targets & {aten.t.default, aten.cat.default, aten.repeat.default, aten._to_copy.default}, targets
    assert record["counts"]["folded"] >= 5 and record["nodes_after"] < record["nodes_before"]
    assert_matches(cm(x), model(x))
    x2 = torch.randn(4, 8)
    assert_matches(cm(x2), model(x2))


def test_a_large_result_is_left_to_run_time_with_a_note():
    cm = compile_fold(WeightMath().eval(), torch.randn(4, 8))
    (record,) = [r for r in cm.report.passes if r["name"] == "fold"]
    assert aten.expand.default in {n.target for n in cm.graph.call_nodes}
    assert any("not folded" in note and "expand" in note for note in record["notes"])


def test_nothing_that_reads_an_input_is_folded():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    x = torch.randn(2, 8)
    cm = compile_fold(model, x)
    (record,) = [r for r in cm.report.passes if r["name"] == "fold"]
    assert record["nodes_after"] == record["nodes_before"] and not record["counts"]
    assert_matches(cm(x), model(x))


def test_a_folded_view_of_a_weight_kept_beside_it_does_not_share_its_memory(tmp_path):
    """x @ w and w.reshape(-1): the folded reshape must be its own tensor, or saving fails."""
    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.w + (x.reshape(-1) * self.w.reshape(-1)).sum()

    model, x = Both().eval(), torch.randn(4, 4)
    cm = blade.compile(model, (x,), backend="eager")
    cm.save(tmp_path / "m.blade")
    assert_matches(blade.load(tmp_path / "m.blade")(x), model(x))
