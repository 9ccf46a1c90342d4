"""blade's CPU decode attention kernel: one query per head against a cache, equal to the op's reference (SDPA) for
fp32 and bf16, grouped heads, broadcast bool masks and rows with nothing visible; chosen only for what it takes."""
from __future__ import annotations

import pytest
import torch

from blade.backends.kernels import decode_native, registry
from blade.ops.attention import attention_reference

pytestmark = pytest.mark.skipif(decode_native.library() is None, reason=f"{decode_native.unavailable_reason()}")


def rel(a, b):
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert err == err, "NaN"
    return err


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("q_heads, kv_heads", [(4, 4), (6, 2)])
def test_equal_to_the_reference(dtype, bound, q_heads, kv_heads):
    gen = torch.Generator().manual_seed(q_heads)
    cache_k = torch.randn(3, 40, kv_heads, 72, generator=gen).to(dtype)  # [slots, length, heads, dim], as blade.llm
    cache_v = torch.randn(3, 40, kv_heads, 72, generator=gen).to(dtype)
    q = torch.randn(2, 1, q_heads, 72, generator=gen).to(dtype).transpose(1, 2)
    k, v = cache_k[:2].transpose(1, 2), cache_v[:2].transpose(1, 2)
    positions = torch.tensor([5, 31])
    mask = torch.arange(40)[None, None, None, :] <= positions[:, None, None, None]
    assert decode_native.supports(q, k, v, mask, False)
    got = decode_native.attention(q, k, v, mask, None, False)
    want = attention_reference(q.float(), torch.repeat_interleave(k.float(), q_heads // kv_heads, 1),
                               torch.repeat_interleave(v.float(), q_heads // kv_heads, 1), mask)
    assert got.dtype == dtype and got.shape == (2, q_heads, 1, 72) and got.transpose(1, 2).is_contiguous()
    assert rel(got, want) < bound


def test_a_row_that_sees_no_key_is_zero_and_no_mask_sees_all():
    q, k, v = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1] = False
    got = decode_native.attention(q, k, v, mask)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert rel(got[0], attention_reference(q, k, v)[0]) < 1e-6
    assert rel(decode_native.attention(q, k, v), attention_reference(q, k, v)) < 1e-6


def test_the_registry_picks_it_for_one_query_only():
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    chosen = registry.choose("flash_attention", "cpu", q, k, v, None, None, False)
    assert getattr(chosen, "name", None) == "decode"
    for refused in [(torch.randn(1, 2, 3, 16), k, v, None, None, False), (q, k, v, None, None, True),
                    (q, k, v, torch.zeros(1, 1, 1, 9), None, False), (q.double(), k.double(), v.double(), None, None,
                                                                      False)]:
        assert getattr(registry.choose("flash_attention", "cpu", *refused), "name", None) != "decode"
