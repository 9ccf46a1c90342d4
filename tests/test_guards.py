"""Shape guards: inputs outside the captured spec raise ShapeError naming input, dim, expected, got."""
from __future__ import annotations

import pytest
import torch
from torch.export import Dim

import blade
from blade.errors import InputError, ShapeError


class TwoInputs(torch.nn.Module):
    def forward(self, tokens, mask):
        return tokens.float().sum(-1) * mask


@pytest.fixture(scope="module")
def cm():
    batch, seq = Dim("batch", min=1, max=8), Dim("seq", min=2, max=16)
    example = (torch.randint(0, 9, (2, 4, 3)), torch.ones(2, 4))
    return blade.compile(TwoInputs(), example, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), backend="eager")


def test_inside_the_range_runs(cm):
    tokens, mask = torch.randint(0, 9, (8, 16, 3)), torch.ones(8, 16)
    assert torch.equal(cm(tokens, mask), TwoInputs()(tokens, mask))


@pytest.mark.parametrize("tokens, mask, message", [
    ((2, 4), (2, 4), "input 'tokens': expected a 3-d tensor [batch, seq, 3], got 2-d [2, 4]"),
    ((2, 4, 5), (2, 4), "input 'tokens' dim 2: expected 3 (static), got 5"),
    ((9, 4, 3), (9, 4), "input 'tokens' dim 0 ('batch'): expected 1..8, got 9"),
    ((2, 17, 3), (2, 17), "input 'tokens' dim 1 ('seq'): expected 2..16, got 17"),
    ((2, 4, 3), (2, 5), "input 'mask' dim 1 ('seq'): got 5, but input 'tokens' has 'seq' = 4"),
])
def test_shape_errors(cm, tokens, mask, message):
    with pytest.raises(ShapeError) as info:
        cm(torch.zeros(tokens, dtype=torch.int64), torch.ones(mask))
    assert message in str(info.value)


def test_dtype_error_says_what_to_do(cm):
    with pytest.raises(ShapeError, match=r"input 'mask': expected dtype fp32 \(torch.float32\), got torch.float64"):
        cm(torch.zeros(2, 4, 3, dtype=torch.int64), torch.ones(2, 4, dtype=torch.float64))


def test_structure_errors(cm):
    tokens, mask = torch.zeros(2, 4, 3, dtype=torch.int64), torch.ones(2, 4)
    with pytest.raises(InputError, match=r"missing input\(s\) \['mask'\]"):
        cm(tokens)
    with pytest.raises(InputError, match=r"unexpected input\(s\) \['extra'\]"):
        cm(tokens, mask, extra=mask)
    with pytest.raises(InputError, match="input 'mask' is a float \\(1.0\\); the model was compiled with a tensor"):
        cm(tokens, 1.0)
    assert torch.equal(cm(mask=mask, tokens=tokens), cm(tokens, mask))


def test_static_model_rejects_another_batch():
    cm = blade.compile(TwoInputs(), (torch.zeros(2, 4, 3, dtype=torch.int64), torch.ones(2, 4)), backend="eager")
    with pytest.raises(ShapeError, match="input 'tokens' dim 0: expected 2 \\(static\\), got 3.*dynamic_shapes"):
        cm(torch.zeros(3, 4, 3, dtype=torch.int64), torch.ones(3, 4))


class Head(torch.nn.Module):
    def forward(self, x):
        return x[:16] * 2  # torch proves the slice a no-op only while 2*d <= 16


def test_derived_dims_are_solved_and_range_checked():
    d = Dim("d", min=1, max=8)
    cm = blade.compile(Head(), (torch.randn(6),), dynamic_shapes=({0: 2 * d},), backend="eager")
    assert "d" in cm.graph.dims and str(cm.graph.inputs[0].val) == "fp32[2*d]"
    x = torch.randn(10)
    assert torch.equal(cm(x), Head()(x))
    with pytest.raises(ShapeError, match=r"size 40 means d = 20, outside \d+\.\.\d+"):
        cm(torch.randn(40))
    with pytest.raises(ShapeError, match=r"expected a size of the form 2\*d, got 7"):
        cm(torch.randn(7))


class Flatten(torch.nn.Module):
    def forward(self, x):
        return x.reshape(-1) * 2


def test_non_contiguous_inputs_work():
    cm = blade.compile(Flatten(), (torch.randn(3, 4),), backend="eager")
    x = torch.randn(4, 3).t()
    assert torch.equal(cm(x), Flatten()(x))


def test_a_call_shaped_like_the_last_good_one_is_still_checked_after_it(cm):
    """flatten remembers the last matching structure to skip re-deriving it; a differently shaped call after a
    good one (a None, a list for a tensor, a missing input) is refused all the same."""
    tokens, mask = torch.zeros(2, 4, 3, dtype=torch.int64), torch.ones(2, 4)
    cm(tokens, mask)
    for bad, error in [((tokens, None), InputError), ((tokens, [mask]), InputError), ((tokens,), InputError)]:
        with pytest.raises(error):
            cm(*bad)
    with pytest.raises(ShapeError):
        cm(tokens, torch.ones(2, 5))
    assert torch.equal(cm(tokens, mask), TwoInputs()(tokens, mask))
