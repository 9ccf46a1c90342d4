"""blade.llm with the defaults a user gets (compile cache on, backend auto): a second compile of the same model hits
the cache yet owns its own KV cache and graphs, and both stay equal to transformers' generate when interleaved."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import blade.llm  # noqa: E402
from llm_models import family, left_padded  # noqa: E402


def test_two_compiles_of_one_model_share_nothing_but_the_answer(monkeypatch, tmp_path):
    monkeypatch.setenv("BLADE_CACHE", "1")
    monkeypatch.setenv("BLADE_CACHE_DIR", str(tmp_path))
    model = family("llama")
    first = blade.llm.compile(model, max_batch=2, max_length=48)
    second = blade.llm.compile(model, max_batch=2, max_length=48)
    assert second.decode_program.report.cache["hit"] and second.prefill_program.report.cache["hit"]
    assert first.decode_program.graph is not second.decode_program.graph
    assert all(first.cache[n] is not second.cache[n] for n in first.cache)
    ids, mask = left_padded(2, [5, 9], 512, 3)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    first.generate(ids, mask, max_new_tokens=6, pad_token_id=0)
    other = second.generate(ids[:1, -5:], max_new_tokens=10, pad_token_id=0)  # writes the second cache only
    assert torch.equal(first.generate(ids, mask, max_new_tokens=12, pad_token_id=0), want)
    assert torch.equal(other, model.generate(ids[:1, -5:], max_new_tokens=10, do_sample=False, pad_token_id=0))
