"""blade.llm: greedy generate equals transformers' generate at fp32 for each causal-LM family, batch 1 and 4,
with and without left padding; stopping per row; the cache (and the weights) written once, shared by both programs."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import blade.llm  # noqa: E402
from blade.errors import InputError  # noqa: E402
from llm_models import family, left_padded  # noqa: E402

@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "qwen2", "phi", "gpt_neox"])
def test_greedy_tokens_equal_transformers_generate(name):
    model = family(name)
    lm = blade.llm.compile(model, max_batch=4, max_length=64)
    cases = {"batch 1": left_padded(1, [12], 512, 1), "batch 4, no padding": left_padded(4, [9] * 4, 512, 2),
             "batch 4, left padded": left_padded(4, [3, 11, 7, 1], 512, 3)}
    for label, (ids, mask) in cases.items():
        with torch.no_grad():
            want = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
        got = lm.generate(ids, mask, max_new_tokens=20, pad_token_id=0)
        assert got.shape == want.shape, f"{name} {label}: {list(got.shape)} vs {list(want.shape)}"
        assert torch.equal(got, want), f"{name} {label}: first differing row {(got != want).any(1).nonzero()}"


def test_rows_stop_at_their_eos_and_pad_after_it():
    model = family("llama")
    ids, mask = left_padded(4, [5, 8, 2, 6], 512, 4)
    lm = blade.llm.compile(model, max_batch=4, max_length=64)
    free = lm.generate(ids, mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    eos = int(free[1, ids.shape[1] + 3])  # row 1 makes this token at its 4th step: it stops there
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    got = lm.generate(ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    assert (got[1, ids.shape[1] + 4:] == 0).all(), "row 1 is padded after its eos"
    assert lm.stats.new_tokens < 4 * 12


def test_min_new_tokens_holds_eos_back():
    model = family("gpt2")
    ids, mask = left_padded(1, [6], 512, 5)
    lm = blade.llm.compile(model, max_batch=1, max_length=64)
    first = int(lm.generate(ids, mask, max_new_tokens=1, eos_token_id=[])[0, -1])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=5, eos_token_id=first,
                              pad_token_id=0)
    got = lm.generate(ids, mask, max_new_tokens=8, min_new_tokens=5, eos_token_id=first, pad_token_id=0)
    assert torch.equal(got, want) and got.shape[1] >= ids.shape[1] + 5


def test_the_cache_is_one_set_of_tensors_written_in_place():
    lm = blade.llm.compile(family("gpt2"), max_batch=2, max_length=32)
    before = {n: t.data_ptr() for n, t in lm.cache.items()}
    for program in (lm.prefill_program, lm.decode_program):
        assert all(program.graph.state[n] is t for n, t in lm.cache.items()), "both programs read one cache"
    code = lm.decode_program.executable.module.code
    assert code.count("aten.index_put_.default") == len(lm.cache) and "aten.index_put.default" not in code
    ids, mask = left_padded(2, [4, 6], 512, 6)
    lm.generate(ids, mask, max_new_tokens=5, eos_token_id=[])
    assert {n: t.data_ptr() for n, t in lm.cache.items()} == before
    keys = next(iter(lm.cache.values()))  # row r: its prompt, then the 4 tokens decode fed back, from slot 0
    for row, filled in ((0, 4 + 4), (1, 6 + 4)):
        assert keys[row, :filled].abs().sum(-1).gt(0).all() and keys[row, filled:].abs().sum() == 0


@pytest.mark.parametrize("name", ["llama", "qwen2"])  # 2 and 1 key/value heads for 4 query heads
def test_grouped_heads_read_the_cache_without_repeating_it(name):
    model = family(name)
    lm = blade.llm.compile(model, max_batch=2, max_length=32)
    kv_heads = model.config.num_key_value_heads
    for program in (lm.prefill_program, lm.decode_program):
        assert "aten.clone.default" not in program.graph.count_targets()  # repeat_kv's copy of the cache
        attention = [n for n in program.graph.call_nodes if str(n.target) == "blade.flash_attention.default"]
        assert len(attention) == model.config.num_hidden_layers
        assert all(n.args[1].val.shape[1] == kv_heads == n.args[2].val.shape[1] for n in attention)


def test_both_programs_hold_one_copy_of_the_weights_and_leave_the_model_alone():
    model = family("gpt2")  # Conv1D weights: each compile makes its own transposed copy
    params = {n: (p.data_ptr(), p.clone()) for n, p in model.named_parameters()}
    lm = blade.llm.compile(model, max_batch=2, max_length=32)

    def storages(program):
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in program.graph.constants.values()}

    prefill, decode = storages(lm.prefill_program), storages(lm.decode_program)
    assert set(prefill) <= set(decode), f"{sum(prefill[p] for p in set(prefill) - set(decode))} bytes held twice"
    for name, p in model.named_parameters():
        assert p.data_ptr() == params[name][0] and torch.equal(p, params[name][1]), f"the model's {name} changed"
    ids, mask = left_padded(2, [5, 3], 512, 8)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=8, pad_token_id=0), want)


def test_sampling_is_reproducible_with_a_generator():
    lm = blade.llm.compile(family("qwen2"), max_batch=2, max_length=48)
    ids, mask = left_padded(2, [5, 9], 512, 7)
    run = [lm.generate(ids, mask, max_new_tokens=16, do_sample=True, temperature=0.8, top_k=40, top_p=0.9,
                       eos_token_id=[], generator=torch.Generator().manual_seed(s)) for s in (11, 11, 12)]
    assert torch.equal(run[0], run[1]) and not torch.equal(run[0], run[2])


def test_bad_requests_name_the_limit():
    lm = blade.llm.compile(family("gpt2"), max_batch=2, max_length=16)
    with pytest.raises(InputError, match="max_batch"):
        lm.generate(torch.ones(3, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(InputError, match="max_length 16"):
        lm.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=7)
    with pytest.raises(InputError, match="all zeros"):
        lm.generate(torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(InputError, match="Hugging Face causal LM"):
        blade.llm.compile(torch.nn.Linear(4, 4))
