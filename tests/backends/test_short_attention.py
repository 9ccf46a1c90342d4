"""Short bf16 CPU attention as plain ops for Inductor (backends/inductor/short_attention.py) against the op."""
import pytest
import torch

import blade
from blade import models
from blade.backends.inductor import short_attention as short
from blade.ops import attention_reference

from helpers import assert_matches

BF16 = torch.bfloat16


def qkv(batch=2, q_heads=4, kv_heads=4, q_len=24, k_len=24, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, q_heads, q_len, dim, generator=gen), torch.randn(batch, kv_heads, k_len, dim, generator=gen),
            torch.randn(batch, kv_heads, k_len, dim, generator=gen))


def masks(q_heads, q_len, k_len):
    gen = torch.Generator().manual_seed(1)
    padding = torch.zeros(2, 1, 1, k_len)
    padding[1, ..., -5:] = -10000.0
    allowed = torch.rand(2, q_heads, q_len, k_len, generator=gen) > 0.4
    allowed[..., 0] = True
    return {"none": None, "padding": padding, "key_vector": torch.randn(k_len, generator=gen), "bool": allowed,
            "per_head_float": torch.randn(2, q_heads, q_len, k_len, generator=gen)}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("lengths", [(24, 24), (1, 24), (7, 20)])
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


def test_only_short_bf16_cpu_attention_is_lowered(monkeypatch):
    calls = []
    monkeypatch.setattr(short, "FLASH_ATTENTION", lambda *a, **kw: calls.append(a[0].dtype) or a[0])
    q, k, v = qkv(k_len=24)
    short.attention_for_inductor(q, k, v)  # fp32: the op
    short.attention_for_inductor(*(t.to(BF16) for t in qkv(q_len=200, k_len=200)))  # long: the op
    assert calls == [torch.float32, BF16]
    assert short.attention_for_inductor(*(t.to(BF16) for t in (q, k, v))).dtype == BF16 and len(calls) == 2


def test_inductor_runs_short_attention_as_ops_and_long_as_the_op(monkeypatch):
    """gpt tiny in bf16 through Inductor: at a length within SHORT_KEYS the generated code calls no attention op, past
    it (one more compile) the op; both match eager fp32 within the bf16 bound."""
    from torch._inductor.utils import run_and_get_code

    from blade.api import supports_bf16
    from blade.target import detect

    if not supports_bf16(detect("cpu")):
        pytest.skip("this CPU has no bf16 dot products: bf16 compiles fp32")
    monkeypatch.setattr(short, "SHORT_KEYS", 16)
    model, _, dims = models.get("gpt")
    cm = blade.compile(model, models.sample_inputs("gpt", seed=1, batch=2, seq=12), dynamic_shapes=dims,
                       backend="inductor", precision="bf16", cache=False, check_accuracy=False)
    assert "plain ops" in str(cm.executable.describe()["nodes"])
    with torch.no_grad():
        for seq, op_called in ((12, False), (40, True)):
            fresh = models.sample_inputs("gpt", seed=seq, batch=2, seq=seq)
            out, codes = run_and_get_code(cm, *fresh)
            assert_matches(out, model(*fresh), tol=2e-2)
            assert codes, f"seq {seq}: no code compiled for this call"
            assert ("blade.flash_attention" in "\n".join(codes)) == op_called, seq
