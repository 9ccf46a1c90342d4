"""The inductor_step backend: blade's kernel calls as cheap torch.library ops, each running what the eager backend
runs; a decode program compiled around them writes the cache in place, compiles once for batch 1 and once for
more, and blade.llm falls back to the eager backend (warned) where Inductor cannot compile."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import blade.llm  # noqa: E402
from blade.backends.eager import DIRECT  # noqa: E402
from blade.backends.inductor import step  # noqa: E402
from blade.backends.inductor.kernel_calls import kernel_ops  # noqa: E402
from blade.backends.kernels import registry  # noqa: E402
from blade.errors import ShapeError  # noqa: E402
from blade.ops.attention import FLASH_ATTENTION, attention_reference  # noqa: E402
from blade.ops.quantized import Q4LINEAR, QEMBEDDING, QLINEAR, quantize_int4, quantize_table, quantize_weight  # noqa: E402
from llm_models import family, left_padded  # noqa: E402


def kernel_cases():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 1, 64), torch.randn(48, 64), torch.randn(48)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = torch.arange(9)[None, None, None, :] <= torch.tensor([3, 8])[:, None, None, None]
    weight_q, weight_scale = quantize_weight(weight, "weight_only")
    packed, scales = quantize_int4(weight, 32)
    table, row_scale = quantize_table(torch.randn(50, 16))
    return {torch.ops.aten.linear.default: (x, weight, bias), FLASH_ATTENTION: (q, k, v, mask, 0.25, False),
            QLINEAR: (x, weight_q, weight_scale, bias, "weight_only", None), Q4LINEAR: (x, packed, scales, bias),
            QEMBEDDING: (table, row_scale, torch.tensor([[1, 7, 49]]))}


def test_each_kernel_op_returns_what_the_eager_backend_computes():
    ops = kernel_ops()
    cases = kernel_cases()
    assert set(ops) == set(cases) == set(DIRECT)
    for op, args in cases.items():
        got, want = ops[op](*args), DIRECT[op](*args)
        assert got.shape == want.shape and got.stride() == want.stride(), op
        assert torch.equal(got, want), op


def test_a_kernel_override_reaches_the_compiled_step():
    model = family("llama")
    lm = blade.llm.compile(model, max_batch=1, max_length=32)
    assert lm.decode_program.backend == "inductor_step"
    calls = []
    ids, mask = left_padded(1, [5], 512, 1)
    with registry.override("flash_attention", "cpu", lambda *args: calls.append(args[0].shape[2]) or
                           attention_reference(*args)):
        lm.generate(ids, mask, max_new_tokens=3)
    layers = model.config.num_hidden_layers
    assert calls == [5] * layers + [1] * 2 * layers, "the prefill's and both decode steps' attention ran the override"


def test_the_decode_step_writes_the_cache_in_place_and_compiles_once_a_kind_of_batch():
    model = family("gpt2")
    lm = blade.llm.compile(model, max_batch=4, max_length=48)
    assert (lm.prefill_program.backend, lm.decode_program.backend) == ("eager", "inductor_step")
    pointers = {n: t.data_ptr() for n, t in lm.cache.items()}
    decode = lm.decode_program
    outputs = decode.executable(torch.tensor([[3], [4]]), torch.tensor([[5], [6]]), *decode.graph.state_values())
    assert all(o is t for o, t in zip(outputs[decode.graph.user_output_count:], decode.graph.state_values())), \
        "the written cache comes back as the cache itself: nothing is copied after the step"
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for batch in (1, 2, 3, 4):
        ids, mask = left_padded(batch, [4 + b for b in range(batch)], 512, batch)
        with torch.no_grad():
            want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(lm.generate(ids, mask, max_new_tokens=6, pad_token_id=0), want), f"batch {batch}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before, \
        "batch 1 and batches 2..4 were compiled by blade.llm.compile, not during generate"
    assert {n: t.data_ptr() for n, t in lm.cache.items()} == pointers


def test_auto_falls_back_to_the_eager_backend_where_inductor_cannot_compile(monkeypatch):
    def broken(module, **options):
        def fails(*args):
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler here")
        return fails

    monkeypatch.setattr(step.torch, "compile", broken)
    model = family("llama")
    with pytest.warns(RuntimeWarning, match="runs on the eager backend instead"):
        lm = blade.llm.compile(model, max_batch=2, max_length=32)
    assert lm.decode_program.backend == "eager"
    ids, mask = left_padded(2, [4, 6], 512, 2)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=5, pad_token_id=0), want)


def test_a_named_backend_runs_both_programs():
    lm = blade.llm.compile(family("llama"), max_batch=1, max_length=32, backend="eager")
    assert (lm.prefill_program.backend, lm.decode_program.backend) == ("eager", "eager")


def test_a_bad_input_to_a_compiled_step_is_named_before_inductor_sees_it():
    lm = blade.llm.compile(family("gpt2"), max_batch=2, max_length=32)
    assert lm.decode_program.backend == "inductor_step"
    with pytest.raises(ShapeError, match="input_ids"):
        lm.decode_program(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ShapeError, match="positions"):
        lm.decode_program(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1))
