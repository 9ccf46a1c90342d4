"""`blade generate`: compiles a causal LM from a factory, generates, reports tokens/s and decode MBU."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from helpers import run_cli  # noqa: E402


def test_generate_prints_tokens_per_second_and_the_tokens_greedy_gives():
    run = run_cli("generate", "blade.models.hf_lm:gpt2_tiny", "--batch", "2", "--prompt-length", "5",
                  "--max-new-tokens", "6", "--ignore-eos", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["new_tokens"] == 12 and len(result["tokens"]) == 2 and len(result["tokens"][0]) == 6
    assert result["tokens_per_s"] > 0 and 0 < result["decode_mbu"]

    import torch

    from blade.models.hf_lm import gpt2_tiny

    model = gpt2_tiny()
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(0))
    want = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert result["tokens"] == want[:, 5:].tolist()

    text = run_cli("generate", "blade.models.hf_lm:gpt2_tiny", "--prompt", "1,2,3", "--max-new-tokens", "3")
    assert text.returncode == 0 and "tok/s" in text.stdout and "% MBU" in text.stdout
    assert "generated 3/3" in text.stderr


def test_a_source_that_is_not_a_factory_is_named():
    run = run_cli("generate", "no_such_module:gpt2")
    assert run.returncode == 1 and "no_such_module:gpt2" in run.stderr
