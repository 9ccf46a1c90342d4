"""Short bf16 CPU attention as plain ops for Inductor (backends/inductor/short_attention.py) against the op."""
import pytest
import torch

import blade
from blade import models
from blade.backends.inductor import short_attention as short
from blade.ops.attention import attention_reference
from blade.target import detect

from helpers import assert_matches, attention_inputs

BF16 = torch.bfloat16


def qkv(**sizes):
    return attention_inputs(**{"q_len": 24, "k_len": 24, "dim": 16, **sizes})


def masks(q_heads, q_len, k_len):
    gen = torch.Generator().manual_seed(1)
    padding = torch.zeros(2, 1, 1, k_len)
    padding[1, ..., -5:] = -10000.0
    allowed = torch.rand(2, q_heads, q_len, k_len, generator=gen) > 0.4
    allowed[..., 0] = True
    dead_rows = allowed.clone()
    dead_rows[0, :, q_len // 2] = False  # a query row with no key: zeros
    return {"none": None, "padding": padding, "key_vector": torch.randn(k_len, generator=gen), "bool": allowed,
            "bool_dead_rows": dead_rows, "per_head_float": torch.randn(2, q_heads, q_len, k_len, generator=gen)}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("lengths", [(24, 24), (1, 24), (7, 20), (30, 20)])
def test_matches_the_op_in_bf16(causal, heads, lengths):
    """Every mask kind, causal (top-left), grouped-query heads, decode and cross lengths: within bf16 rounding of
    the fp32 reference, no worse than 2x bf16 SDPA's error, output memory [B, Sq, Hq, Dv]."""
    q, k, v = qkv(q_heads=heads[0], kv_heads=heads[1], q_len=lengths[0], k_len=lengths[1])
    for name, mask in masks(heads[0], *lengths).items():
        ref = attention_reference(q, k, v, mask, None, causal)
        low = [t.to(BF16) for t in (q, k, v)]
        low_mask = mask.to(BF16) if mask is not None and mask.is_floating_point() else mask
        out = short.short_attention(*low, low_mask, None, causal)
        sdpa = attention_reference(*low, low_mask, None, causal)
        assert out.dtype == BF16 and out.shape == ref.shape and out.transpose(1, 2).is_contiguous(), name
        err = float((out.float() - ref).norm() / ref.norm())
        assert err <= 1e-2 and err <= 2 * float((sdpa.float() - ref).norm() / ref.norm()) + 1e-4, (name, err)


def test_rows_with_no_key_are_zero_and_nan_stays_nan():
    q, k, v = (t.to(BF16) for t in qkv())
    mask = torch.zeros(2, 1, 1, 24, dtype=BF16)
    mask[1] = float("-inf")  # batch 1 has no key at all
    out = short.short_attention(q, k, v, mask, None, False)
    assert (out[1] == 0).all() and torch.isfinite(out[0]).all() and (out[0] != 0).any()
    left_padded = torch.zeros(24, dtype=BF16)
    left_padded[0] = float("-inf")  # under causal, query 0 sees only key 0
    out = short.short_attention(q, k, v, left_padded, None, True)
    assert (out[:, :, 0] == 0).all() and torch.isfinite(out).all()
    q[0, 0, 3, 0] = float("nan")
    out = short.short_attention(q, k, v, None, None, False)
    assert torch.isnan(out[0, 0, 3]).all() and torch.isfinite(out[1]).all()
    # a row the mask leaves no key is zeros as the op says, even with NaN in its query or in a masked key's value
    v[1, :, 5] = float("inf")
    out = short.short_attention(q, k, v, mask, None, False)
    assert (out[1] == 0).all() and torch.isnan(out[0, 0, 3]).all()


def test_only_bf16_cpu_attention_over_1_to_short_keys_keys_is_lowered(monkeypatch):
    """The key count decides (decode, one query over many keys, keeps the op), 128 keys are short and 129 are not,
    fp32 keeps the op, and so do no keys at all."""
    calls = []
    monkeypatch.setattr(short, "FLASH_ATTENTION", lambda *a, **kw: calls.append((a[0].dtype, a[1].shape[2])) or a[0])
    low = lambda q_len, k_len: [t.to(BF16) for t in qkv(q_len=q_len, k_len=k_len)]  # noqa: E731
    short.attention_for_inductor(*qkv(k_len=24))
    short.attention_for_inductor(*low(1, 200))
    short.attention_for_inductor(*low(129, 129))
    short.attention_for_inductor(*low(4, 0))
    assert calls == [(torch.float32, 24), (BF16, 200), (BF16, 129), (BF16, 0)]
    assert short.attention_for_inductor(*low(128, 128)).dtype == BF16 and len(calls) == 4


def test_inductor_runs_short_attention_as_ops_and_long_as_the_op(monkeypatch):
    """gpt tiny in bf16 through Inductor, one executable: a length within SHORT_KEYS compiles a graph with no attention
    op; a longer one compiles once more, with the op; the short length again compiles nothing. All match eager fp32
    within the bf16 bound. A kernel registered for the CPU keeps every call."""
    from blade.target import supports_bf16
    from blade.backends import inductor
    from blade.backends.kernels import registry

    if not supports_bf16(detect("cpu")):
        pytest.skip("this CPU has no bf16 dot products: bf16 compiles fp32")
    monkeypatch.setenv("BLADE_NATIVE_ATTENTION", "0")  # short attention is the lowering where the native kernel is not
    graphs = []
    real = inductor.inductor_with_freezing
    monkeypatch.setattr(inductor, "inductor_with_freezing",
                        lambda gm, inputs: graphs.append("torch.ops.blade.flash_attention" in gm.code) or real(gm, inputs))
    monkeypatch.setattr(short, "SHORT_KEYS", 16)
    model, _, dims = models.get("gpt")
    cm = blade.compile(model, models.sample_inputs("gpt", seed=1, batch=2, seq=12), dynamic_shapes=dims,
                       backend="inductor", precision="bf16", cache=False, check_accuracy=False)
    assert "plain ops" in str(cm.executable.describe()["nodes"])
    with torch.no_grad():
        for seq, compiled in ((12, [False]), (40, [False, True]), (13, [False, True])):
            fresh = models.sample_inputs("gpt", seed=seq, batch=2, seq=seq)
            assert_matches(cm(*fresh), model(*fresh), tol=2e-2)
            assert graphs == compiled, (seq, graphs)
    graphs.clear()
    with registry.override("flash_attention", "cpu", lambda *a: attention_reference(*a)):
        own = blade.compile(model, models.sample_inputs("gpt", seed=1, batch=2, seq=12), dynamic_shapes=dims,
                            backend="inductor", precision="bf16", cache=False, check_accuracy=False)
        with torch.no_grad():
            own(*models.sample_inputs("gpt", seed=2, batch=2, seq=12))
    assert graphs == [True] and "plain ops" not in str(own.executable.describe()["nodes"])
