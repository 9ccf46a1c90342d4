"""Hugging Face BERT and GPT-2 (small random configs, no download) compile, match eager and stay dynamic."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.export import Dim
from torch.utils._pytree import tree_leaves

import blade
from blade.perf.accuracy import relative_error
from blade.errors import ShapeError
from blade.ir.fused import is_fused
from blade.ir.graph import Node

from helpers import forbid_recompiling

transformers = pytest.importorskip("transformers")

VOCAB, MAX_POS, HIDDEN = 128, 64, 32
TOL = 1e-6
CASES = [(model, attn) for model in ("bert", "gpt2") for attn in ("eager", "sdpa")]
KEYS = {"bert": ["last_hidden_state", "pooler_output"], "gpt2": ["logits"]}
# Every model takes (input_ids, attention_mask) by name; BERT's forward also takes them as its first two
# positional parameters (GPT-2's second parameter is its KV cache, see test_none_for_absent_optional_input).
CALLS = {
    "kwargs": lambda f, ids, mask: f(input_ids=ids, attention_mask=mask),
    "kwargs-reordered": lambda f, ids, mask: f(attention_mask=mask, input_ids=ids),
    "mixed": lambda f, ids, mask: f(ids, attention_mask=mask),
}
POSITIONAL = {"bert": {"positional": lambda f, ids, mask: f(ids, mask)}, "gpt2": {}}


def build(name: str, attn: str) -> torch.nn.Module:
    """A 2-layer, 32-wide model with seeded random weights (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _build(name, attn)
    assert model.config._attn_implementation == attn
    return model.eval()


def _build(name: str, attn: str) -> torch.nn.Module:
    if name == "bert":
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=MAX_POS,
                                         attn_implementation=attn)
        return transformers.BertModel(config)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=MAX_POS,
                                     use_cache=False, bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return transformers.GPT2LMHeadModel(config)


def make_inputs(batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an attention mask with some padding in the first row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - seq // 3:] = 0
    return ids, mask


def assert_matches(out, ref, keys: list[str]) -> None:
    """Same ModelOutput class and keys, and every tensor within TOL relative error (NaN fails)."""
    assert type(out) is type(ref)
    assert list(out.keys()) == list(ref.keys()) == keys
    outs, refs = tree_leaves(out), tree_leaves(ref)
    assert len(outs) == len(refs) == len(keys)
    for key, o, r in zip(keys, outs, refs):
        assert o.shape == r.shape, key
        err = relative_error(o, r)
        assert err <= TOL, f"{key}: rel_err {err}"


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def case(request):
    name, attn = request.param
    model = build(name, attn)
    ids, mask = make_inputs(2, 8, seed=1)
    batch, seq = Dim("batch", min=1, max=8), Dim("seq", min=2, max=MAX_POS)
    if name == "bert":  # example inputs by position
        cm = blade.compile(model, (ids, mask), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), backend="eager")
    else:  # example inputs by name
        cm = blade.compile(model, example_kwargs={"input_ids": ids, "attention_mask": mask},
                           dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}, backend="eager")
    return name, model, cm


def test_report(case):
    name, _, cm = case
    report = cm.report
    assert report.backend == "eager"
    assert sorted(d.split()[0] for d in report.dims) == ["batch", "seq"], report.dims
    assert report.specialized == []
    assert report.accuracy is not None and report.accuracy.ok, str(report)
    assert len(report.accuracy.outputs) == len(KEYS[name])


def test_every_attention_becomes_one_flash_attention(case):
    """Both layers, whether written out ("eager") or through SDPA: no softmax left, 2 blade ops."""
    _, _, cm = case
    counts = cm.graph.count_targets()
    assert counts.get("blade.flash_attention.default") == 2 and "aten.softmax.int" not in counts, counts
    assert "aten.scaled_dot_product_attention.default" not in counts


LAYERS = 2


def test_norms_gelus_bias_adds_and_qkv_projections_are_fused(case):
    """Counted in the optimized graph: no layer norm, GELU or bias add is left on its own, and each
    layer computes Q, K and V with one matmul."""
    name, _, cm = case
    counts = cm.graph.count_targets()
    assert "aten.layer_norm.default" not in counts and "aten.gelu.default" not in counts, counts
    fused = [n for n in cm.graph.call_nodes if is_fused(n)]
    patterns = Counter(n.target.pattern for n in fused)
    loose_adds = [n for n in cm.graph.call_nodes if n.target == torch.ops.aten.add.Tensor
                  and any(isinstance(a, Node) and a.op == "constant" for a in n.args)]
    assert not loose_adds, [n.name for n in loose_adds]  # biases live in a matmul or a region
    readers: dict = {}
    for node in cm.graph.call_nodes:
        if node.target in (torch.ops.aten.linear.default, torch.ops.aten.addmm.default):
            x = node.args[0] if node.target == torch.ops.aten.linear.default else node.args[1]
            readers.setdefault(x.name, []).append(node.name)
    assert all(len(r) == 1 for r in readers.values()), readers  # no two projections of one input
    if name == "bert":  # residual + bias + LN twice per layer, and the embeddings' sum + LN; FFN + GELU
        assert patterns["skip_layer_norm"] == 2 * LAYERS + 1 and patterns["linear_gelu"] == LAYERS, patterns
        assert counts["aten.split_with_sizes.default"] == LAYERS  # Q, K, V from one wide linear
    else:  # GPT-2: pre-LN, so every LN (embeddings + position first, ln_f last) takes a residual add
        assert patterns["skip_layer_norm"] == 2 * LAYERS + 1 and patterns["addmm_gelu_tanh"] == LAYERS, patterns
        assert counts["aten.addmm.default"] == 3 * LAYERS  # c_attn (Q, K, V at once), c_proj, c_fc + c_proj


def test_fresh_inputs_every_size_and_convention_without_recompile(case, monkeypatch):
    name, model, cm = case
    forbid_recompiling(monkeypatch)
    for seed, (batch, seq) in enumerate([(3, 13), (1, MAX_POS), (8, 2), (2, 8)], start=100):
        ids, mask = make_inputs(batch, seq, seed)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask)
        for call in {**CALLS, **POSITIONAL[name]}.values():
            assert_matches(call(cm, ids, mask), ref, KEYS[name])
        assert tree_leaves(ref)[0].shape[:2] == (batch, seq)
    with pytest.raises(ShapeError, match="batch"):
        CALLS["kwargs"](cm, *make_inputs(9, 8, seed=0))  # batch 9 is outside [1, 8]


def test_none_for_absent_optional_input():
    """HF code passes None for optional inputs: positionally (GPT-2's cache) or by name (token_type_ids)."""
    model = build("gpt2", "eager")
    ids, mask = make_inputs(2, 8, seed=1)
    cm = blade.compile(model, example_kwargs={"input_ids": ids, "attention_mask": mask, "token_type_ids": None}, backend="eager")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
    assert_matches(cm(ids, None, mask), ref, KEYS["gpt2"])
    assert_matches(cm(input_ids=ids, attention_mask=mask, token_type_ids=None), ref, KEYS["gpt2"])
    with pytest.raises(blade.errors.InputError, match="compiled with is None"):
        cm(input_ids=ids, attention_mask=None)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_bf16_is_no_less_accurate_than_casting_the_model_at_base_dims(name):
    """Hugging Face BERT / GPT-2 with base dims (hidden 768, 12 heads, FFN 3072; 2 layers to stay quick):
    blade's bf16 keeps norms, softmax and the residual stream in fp32, so its error must not exceed
    model.to(torch.bfloat16)'s. At 160 tokens (and a padded row) attention runs blade's bf16 CPU kernel: the fused
    native one where it runs here, else the blocked one."""
    import copy

    from blade.backends.kernels import attention_blocked, attention_native

    with torch.random.fork_rng():
        torch.manual_seed(0)
        if name == "bert":
            model = transformers.BertModel(transformers.BertConfig(num_hidden_layers=2, attn_implementation="sdpa"))
        else:
            model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, use_cache=False,
                                                                         attn_implementation="sdpa"))
    model.eval()
    ids = torch.randint(0, 1000, (2, 160), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, -30:] = 0
    cm = blade.compile(model, (), example_kwargs={"input_ids": ids, "attention_mask": mask}, backend="eager",
                       precision="bf16")
    fresh = torch.randint(0, 1000, (2, 160), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = tree_leaves(model(input_ids=fresh, attention_mask=mask))[0]
        cast = tree_leaves(copy.deepcopy(model).to(torch.bfloat16)(input_ids=fresh, attention_mask=mask))[0].float()
    kernels = []
    with pytest.MonkeyPatch.context() as patch:
        for module, name in ((attention_blocked, "blocked_attention"), (attention_native, "attention")):
            real = getattr(module, name)
            patch.setattr(module, name, lambda *a, real=real, name=name: kernels.append((name, a[0].dtype)) or real(*a))
        ours = relative_error(tree_leaves(cm(input_ids=fresh, attention_mask=mask))[0], ref)
    expected = "attention" if attention_native.available() else "blocked_attention"
    assert kernels == [(expected, torch.bfloat16)] * 2, kernels
    assert ours <= 1e-2 and ours <= relative_error(cast, ref), (ours, relative_error(cast, ref))
