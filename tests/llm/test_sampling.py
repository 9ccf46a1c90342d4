"""blade.llm.Sampling processes logits as transformers' warpers do (temperature, top-k, top-p, min tokens)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers.generation import logits_process as hf  # noqa: E402

from blade.errors import InputError  # noqa: E402
from blade.llm import Sampling  # noqa: E402


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 20, None), (1.3, None, 0.8),
                                                        (0.9, 50, 0.95), (1.0, 1, 0.5)])
def test_scores_equal_the_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(0)) * 3
    want = logits.clone()
    if temperature != 1.0:
        want = hf.TemperatureLogitsWarper(temperature)(None, want)
    if top_k is not None:
        want = hf.TopKLogitsWarper(top_k)(None, want)
    if top_p is not None:
        want = hf.TopPLogitsWarper(top_p)(None, want)
    got = Sampling(True, temperature, top_k, top_p).scores(logits, generated=0)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_min_new_tokens_masks_every_eos_until_reached():
    logits = torch.zeros(2, 10)
    sampling = Sampling(min_new_tokens=3, eos_token_ids=(4, 7))
    assert torch.isinf(sampling.scores(logits, 2)[:, [4, 7]]).all()
    assert not torch.isinf(sampling.scores(logits, 3)).any()


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="temperature"):
        Sampling(True, temperature=0)
    with pytest.raises(InputError, match="top_p"):
        Sampling(True, top_p=1.5)
