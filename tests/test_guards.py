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
    return blade.compile(TwoInputs(), example, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))


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
    with pytest.raises(ShapeError, match=r"input 'mask': expected dtype f32 \(torch.float32\), got torch.float64"):
        cm(torch.zeros(2, 4, 3, dtype=torch.int64), torch.ones(2, 4, dtype=torch.float64))


def test_structure_errors(cm):
    tokens, mask = torch.zeros(2, 4, 3, dtype=torch.int64), torch.ones(2, 4)
    with pytest.raises(InputError, match=r"missing input\(s\) \['mask'\]"):
        cm(tokens)
    with pytest.raises(InputError, match=r"unexpected input\(s\) \['extra'\]"):
        cm(tokens, mask, extra=mask)
    with pytest.raises(InputError, match="input 'args\\[1\\]' is a float"):
        cm(tokens, 1.0)
    assert torch.equal(cm(mask=mask, tokens=tokens), cm(tokens, mask))


def test_static_model_rejects_another_batch():
    cm = blade.compile(TwoInputs(), (torch.zeros(2, 4, 3, dtype=torch.int64), torch.ones(2, 4)))
    with pytest.raises(ShapeError, match="input 'tokens' dim 0: expected 2 \\(static\\), got 3.*dynamic_shapes"):
        cm(torch.zeros(3, 4, 3, dtype=torch.int64), torch.ones(3, 4))
