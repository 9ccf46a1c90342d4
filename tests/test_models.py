"""The model zoo: registry, determinism, input sampling and eager sanity of every model."""
from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves

import blade.models as zoo
from blade.models import gpt

from helpers import fresh_dims

NAMES = ["bert", "dit", "dlrm", "gpt", "gpt_decode", "mlp", "resnet", "vit"]
DYNAMIC_DIMS = {"bert": {"batch", "seq"}, "gpt": {"batch", "seq"}, "gpt_decode": {"batch", "past"}}


def dynamic_dim_names(dynamic_shapes) -> set[str]:
    return {dim.__name__ for spec in dynamic_shapes if spec for dim in spec.values()}


def assert_finite_and_varied(outputs) -> None:
    for out in tree_leaves(outputs):
        assert out.is_floating_point()
        assert torch.isfinite(out).all()
        assert out.std() > 1e-4, "output is (nearly) constant"


def test_names():
    assert zoo.names() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_get_tiny_returns_triple(name):
    model, example_inputs, dynamic_shapes = zoo.get(name)
    assert isinstance(model, torch.nn.Module)
    assert not any(module.training for module in model.modules())
    assert isinstance(example_inputs, tuple) and all(isinstance(x, torch.Tensor) for x in example_inputs)
    assert isinstance(dynamic_shapes, tuple) and len(dynamic_shapes) == len(example_inputs)
    expected_dims = DYNAMIC_DIMS.get(name, {"batch"})
    assert dynamic_dim_names(dynamic_shapes) == expected_dims
    for x, spec in zip(example_inputs, dynamic_shapes):
        for index, dim in (spec or {}).items():
            assert dim.min <= x.shape[index] <= dim.max
            assert x.shape[index] >= 2, "example sizes of 0 or 1 would be specialized by torch.export"


@pytest.mark.parametrize("name", NAMES)
def test_module_factories_match_get(name):
    model, example_inputs, _ = getattr(zoo, name).tiny()
    reference, reference_inputs, _ = zoo.get(name, "tiny")
    assert type(model) is type(reference)
    for x, y in zip(example_inputs, reference_inputs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", NAMES)
def test_builds_are_deterministic(name):
    first, inputs_a, _ = zoo.get(name)
    second, inputs_b, _ = zoo.get(name)
    state_a, state_b = first.state_dict(), second.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    for x, y in zip(inputs_a, inputs_b):
        assert torch.equal(x, y)


def test_building_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.get("mlp")
    assert torch.equal(torch.rand(3), expected)


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="nope") as info:
        zoo.get("nope")
    assert "bert" in str(info.value)
    with pytest.raises(ValueError, match="nope"):
        zoo.sample_inputs("nope")


def test_unknown_size_raises():
    with pytest.raises(ValueError, match="huge") as info:
        zoo.get("mlp", "huge")
    assert "tiny" in str(info.value) and "base" in str(info.value)
    with pytest.raises(ValueError, match="huge"):
        zoo.sample_inputs("bert", "huge")


def test_unknown_dim_raises():
    with pytest.raises(ValueError, match="seq"):
        zoo.sample_inputs("resnet", seq=4)


@pytest.mark.parametrize("name", NAMES)
def test_sample_inputs_match_example_structure(name):
    _, example_inputs, dynamic_shapes = zoo.get(name)
    dims = fresh_dims(name)
    inputs = zoo.sample_inputs(name, seed=5, **dims)
    assert len(inputs) == len(example_inputs)
    for x, example, spec in zip(inputs, example_inputs, dynamic_shapes):
        assert x.dtype == example.dtype
        expected = list(example.shape)
        for index, dim in (spec or {}).items():
            expected[index] = dims[dim.__name__]
        assert list(x.shape) == expected


def test_sample_inputs_keep_unset_dims_and_follow_seed():
    _, (example_ids, _), _ = zoo.get("bert")
    ids, _ = zoo.sample_inputs("bert", batch=4)
    assert ids.shape == (4, example_ids.shape[1])
    assert torch.equal(zoo.sample_inputs("bert", seed=1)[0], zoo.sample_inputs("bert", seed=1)[0])
    assert not torch.equal(zoo.sample_inputs("bert", seed=1)[0], zoo.sample_inputs("bert", seed=2)[0])


def test_sample_input_values_are_valid():
    ids, mask = zoo.sample_inputs("bert", batch=5, seq=20, seed=3)
    assert 0 <= ids.min() and ids.max() < zoo.bert.CONFIGS["tiny"].vocab_size
    assert set(mask.unique().tolist()) <= {0, 1}
    assert (mask[:, 0] == 1).all(), "every row keeps at least one unmasked token"
    dlrm_config = zoo.dlrm.CONFIGS["tiny"]
    _, sparse = zoo.sample_inputs("dlrm", batch=6)
    assert sparse.shape == (6, dlrm_config.n_tables, dlrm_config.bag_size)
    assert 0 <= sparse.min() and sparse.max() < dlrm_config.rows_per_table
    _, timesteps, labels = zoo.sample_inputs("dit", batch=4)
    assert timesteps.dtype == torch.float32 and labels.max() < zoo.dit.CONFIGS["tiny"].n_classes


@pytest.mark.parametrize("name", NAMES)
def test_eager_forward_is_finite_and_varied(name):
    model, _, _ = zoo.get(name)
    dims = fresh_dims(name)
    with torch.no_grad():
        assert_finite_and_varied(model(*zoo.sample_inputs(name, seed=1, **dims)))


@pytest.mark.parametrize("name", NAMES)
def test_runs_cast_to_bf16_with_its_float_inputs(name):
    """model.to(bf16) with the float inputs cast too (what a GPU benchmark does) runs and stays close to fp32."""
    model, _, _ = zoo.get(name)
    inputs = zoo.sample_inputs(name, seed=1, **fresh_dims(name))
    with torch.no_grad():
        reference = model(*inputs)
        out = model.to(torch.bfloat16)(*(t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs))
    for got, want in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(reference), strict=True):
        assert got.dtype == torch.bfloat16
        assert float((got.float() - want).norm() / want.norm()) < 5e-2


def test_dit_takes_integer_timesteps_too():
    model, _, _ = zoo.get("dit")
    latents, timesteps, labels = zoo.sample_inputs("dit", seed=2, batch=3)
    with torch.no_grad():
        as_float, as_int = model(latents, timesteps.round(), labels), model(latents, timesteps.round().long(), labels)
    assert as_int.dtype == torch.float32 and torch.allclose(as_int, as_float)


def test_output_shapes():
    with torch.no_grad():
        hidden, pooled = zoo.get("bert")[0](*zoo.sample_inputs("bert", batch=3, seq=9))
        assert hidden.shape == (3, 9, 32) and pooled.shape == (3, 32)
        assert zoo.get("gpt")[0](*zoo.sample_inputs("gpt", batch=3, seq=9)).shape == (3, 9, 100)
        latents = zoo.sample_inputs("dit", batch=3)
        assert zoo.get("dit")[0](*latents).shape == latents[0].shape
        assert zoo.get("dlrm")[0](*zoo.sample_inputs("dlrm", batch=3)).shape == (3, 1)


def test_gpt_is_causal():
    model, _, _ = zoo.get("gpt")
    (ids,) = zoo.sample_inputs("gpt", batch=2, seq=10)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % gpt.CONFIGS["tiny"].vocab_size
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert torch.equal(before[:, :-1], after[:, :-1])
    assert not torch.equal(before[:, -1], after[:, -1])


def test_gpt_ties_lm_head_to_token_embedding():
    model, _, _ = zoo.get("gpt")
    assert model.lm_head.weight is model.token_embedding.weight


def test_bert_ignores_padded_tokens():
    model, _, _ = zoo.get("bert")
    ids, _ = zoo.sample_inputs("bert", batch=2, seq=10)
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % zoo.bert.CONFIGS["tiny"].vocab_size
    with torch.no_grad():
        (hidden_before, pooled_before), (hidden_after, pooled_after) = model(ids, mask), model(changed, mask)
    torch.testing.assert_close(hidden_before[:, :6], hidden_after[:, :6])
    torch.testing.assert_close(pooled_before, pooled_after)


def test_gpt_tiny_llama_variant():
    model, _, dynamic_shapes = gpt.tiny_llama()
    attention = model.blocks[0].attn
    assert attention.n_kv_heads < attention.n_heads
    assert attention.k_proj.out_features < attention.q_proj.out_features
    assert isinstance(model.final_norm, zoo._layers.RMSNorm)
    assert isinstance(model.blocks[0].mlp, zoo._layers.SwiGLU)
    assert dynamic_dim_names(dynamic_shapes) == {"batch", "seq"}
    with torch.no_grad():
        logits = model(*zoo.sample_inputs("gpt", batch=3, seq=7))
    assert logits.shape == (3, 7, gpt.TINY_LLAMA.vocab_size)
    assert_finite_and_varied(logits)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_base_forward(name):
    model, example_inputs, _ = zoo.get(name, "base")
    assert not model.training
    with torch.no_grad():
        assert_finite_and_varied(model(*example_inputs))


@pytest.mark.parametrize("variant", ["tiny", "tiny_llama"])
def test_gpt_decode_step_continues_the_full_forward(variant):
    """prefill(ids[:, :-1]) then one step on the last token gives the full forward's last logits and
    the cache a prefill of every token would leave."""
    from blade.models import gpt_decode

    model, _, _ = getattr(gpt_decode, variant)()
    ids = torch.randint(0, 100, (3, 10))
    keys, values = model.prefill(ids[:, :-1])
    with torch.no_grad():
        logits, new_keys, new_values = model(ids[:, -1:], keys, values)
        full = model.gpt(ids)
    torch.testing.assert_close(logits[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    all_keys, all_values = model.prefill(ids)
    torch.testing.assert_close(new_keys, all_keys)
    torch.testing.assert_close(new_values, all_values)
    with pytest.raises(ValueError, match="one token"):
        model(ids[:, -2:], keys, values)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_gpt_decode_7b_is_for_gpus():
    with pytest.raises(ValueError, match="CUDA"):
        zoo.get("gpt_decode", "7b")
