"""blade.llm.Engine: in-flight batching gives every request of a mixed trace the tokens it gets alone, refills rows
as requests finish, and stops each at its eos."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import blade.llm  # noqa: E402
from blade.errors import InputError  # noqa: E402
from llm_models import family  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    return blade.llm.compile(family("llama"), max_batch=3, max_length=64)


def trace(count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (count,), generator=gen).tolist()
    news = torch.randint(1, 30, (count,), generator=gen).tolist()
    return [(torch.randint(1, 512, (n,), generator=gen), new) for n, new in zip(lengths, news)]


def test_every_request_gets_the_tokens_it_gets_alone(lm):
    requests = trace(9, 0)
    engine = blade.llm.Engine(lm)
    ids = [engine.submit(prompt, new, eos_token_id=[]) for prompt, new in requests]
    steps = 0
    while engine.busy:
        engine.step()
        steps += 1
        assert sum(r is not None for r in engine.rows) <= 3
    outputs = engine.run()
    for i, (prompt, new) in zip(ids, requests):
        alone = lm.generate(prompt[None], max_new_tokens=new, eos_token_id=[])[0]
        assert torch.equal(outputs[i], alone), f"request {i} ({prompt.numel()} + {new})"
    assert steps < sum(new for _, new in requests), "requests shared decode steps"


def test_serve_keeps_request_order_and_stops_at_eos(lm):
    requests = trace(4, 1)
    free = lm.serve(requests, eos_token_id=[])
    eos = int(free[0][requests[0][0].numel() + 2])  # request 0's third new token
    stopped = lm.serve(requests, eos_token_id=eos)
    for (prompt, new), out, full in zip(requests, stopped, free):
        made = full[prompt.numel():].tolist()
        want = made[:made.index(eos) + 1] if eos in made else made
        assert out[prompt.numel():].tolist() == want


def test_a_request_longer_than_the_cache_is_refused(lm):
    with pytest.raises(InputError, match="max_length 64"):
        blade.llm.Engine(lm).submit(torch.ones(40, dtype=torch.long), 30)
