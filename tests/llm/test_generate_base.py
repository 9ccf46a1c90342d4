"""blade.llm at reference sizes (slow): greedy tokens equal transformers' generate for GPT-2 base and the 134 M
Llama-architecture model, batch 1 and a left-padded batch of 4. Run with `python -m pytest -m slow tests/llm`."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import blade.llm  # noqa: E402
from blade.models import hf_lm  # noqa: E402
from llm_models import left_padded  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama_134m"])
def test_greedy_tokens_equal_at_reference_size(name):
    model = getattr(hf_lm, name)()
    vocab = model.get_output_embeddings().weight.shape[0]
    lm = blade.llm.compile(model, max_batch=4, max_length=96)
    for ids, mask in (left_padded(1, [24], vocab, 1), left_padded(4, [9, 30, 17, 4], vocab, 2)):
        with torch.no_grad():
            want = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        assert torch.equal(lm.generate(ids, mask, max_new_tokens=32, eos_token_id=[], pad_token_id=0), want)
