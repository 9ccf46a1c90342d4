"""conv_bn: an inference batch norm after a convolution folds into it; anything else is left alone."""
from __future__ import annotations

import pytest
import torch

import blade
from blade.passes import cleanup, conv_bn
from blade.perf.accuracy import relative_error

aten = torch.ops.aten


def _calibrated(model: torch.nn.Module, *inputs) -> torch.nn.Module:
    """Running statistics of random batches (HF-style mean 0 / var 1 would make the fold trivial)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(*[torch.randn_like(x) * 2 + 1 for x in inputs])
    return model.eval()


class ConvBN(torch.nn.Module):
    def __init__(self, bias: bool, affine: bool, padding="same", groups: int = 1, dim: int = 2):
        super().__init__()
        torch.manual_seed(0)
        conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dim]
        norm = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dim]
        self.conv = conv(8, 8, 3, padding=padding, bias=bias, groups=groups)
        self.norm = norm(8, affine=affine)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


def _compile(model, x, **kw):
    return blade.compile(model, (x,), backend="eager", passes=[cleanup.run, conv_bn.run], **kw)


@pytest.mark.parametrize("bias, affine, padding, groups, dim", [
    (True, True, 1, 1, 2), (False, True, "same", 1, 2), (False, False, 0, 8, 2), (True, True, "valid", 2, 1),
    (False, True, 1, 1, 3)])
def test_the_norm_folds_into_the_conv_and_the_numbers_hold(bias, affine, padding, groups, dim):
    shape = {1: (2, 8, 20), 2: (2, 8, 12, 12), 3: (2, 8, 6, 6, 6)}[dim]
    x = torch.randn(*shape)
    model = _calibrated(ConvBN(bias, affine, padding, groups, dim), x)
    cm = _compile(model, x)
    targets = [n.target for n in cm.graph.call_nodes]
    assert aten.batch_norm.default not in targets
    assert sum(t in conv_bn.CONVS for t in targets) == 1
    (record,) = [r for r in cm.report.passes if r["name"] == "conv_bn"]
    assert record["counts"]["batch_norm_folded"] == 1
    fresh = torch.randn(*shape)
    with torch.no_grad():
        assert relative_error(cm(fresh), model(fresh)) <= 1e-5


class Shared(torch.nn.Module):
    """The conv's output is read by the norm and by the residual: folding would change the residual."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y) + y


class NormOfInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return self.norm(x + 1)


@pytest.mark.parametrize("model", [Shared(), NormOfInput(), torch.nn.Sequential(
    torch.nn.ConvTranspose2d(8, 8, 3), torch.nn.BatchNorm2d(8))], ids=["shared", "not_a_conv", "transposed"])
def test_what_does_not_fold_is_left_alone(model):
    x = torch.randn(2, 8, 10, 10)
    model = _calibrated(model, x)
    cm = _compile(model, x)
    assert aten.batch_norm.default in {n.target for n in cm.graph.call_nodes}
    with torch.no_grad():
        assert relative_error(cm(x), model(x)) <= 1e-5


def test_the_default_pipeline_folds_hf_resnet_batch_norms_before_bf16_lowers_them():
    pytest.importorskip("transformers")
    from blade.models import hf_vision

    model, example, _ = hf_vision.get("resnet50", "tiny")
    cm = blade.compile(model, example, backend="eager", precision="bf16")
    targets = [n.target for n in cm.graph.call_nodes]
    assert not {aten.batch_norm.default, conv_bn.LEGIT} & set(targets)
    precisions = list(cm.report.matmul_precision.values())
    assert precisions.count("bf16") >= len(precisions) - 1  # the folded convolutions are lowered
    fp32 = blade.compile(model, example, backend="eager")
    (record,) = [r for r in fp32.report.passes if r["name"] == "conv_bn"]
    assert record["counts"]["batch_norm_folded"] == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
