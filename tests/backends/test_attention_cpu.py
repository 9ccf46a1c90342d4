"""blade::flash_attention's blocked bf16 CPU kernel (backends/kernels/attention_blocked.py) against the op's fp32 reference."""
import pytest
import torch

from blade.backends.kernels import attention_blocked, registry
from blade.backends.kernels.attention_blocked import blocked_attention, prefers_blocked
from blade.ops.attention import FLASH_ATTENTION, attention_reference
from helpers import attention_inputs, finite_relative_error

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 16 queries, so that small shapes cross several blocks (and the diagonal one)."""
    monkeypatch.setattr(attention_blocked, "BLOCK_ROWS", 16)


def qkv(**sizes):
    return attention_inputs(**{"dim": 32, **sizes})


rel = finite_relative_error


def check(q, k, v, mask=None, scale=None, causal=False, bound=1e-2):
    """The kernel on bf16 inputs within `bound` of the fp32 reference, and no worse than 2.5x bf16 SDPA's error."""
    ref = attention_reference(q, k, v, mask, scale, causal)
    lq, lk, lv = (t.to(BF16) for t in (q, k, v))
    low_mask = mask.to(BF16) if mask is not None and mask.is_floating_point() else mask
    out = blocked_attention(lq, lk, lv, low_mask, scale, causal)
    assert out.dtype == BF16 and out.shape == ref.shape
    assert out.transpose(1, 2).is_contiguous(), "the op's output memory is [B, Sq, Hq, Dv]"
    sdpa = attention_reference(lq, lk, lv, low_mask, scale, causal)
    assert rel(out, ref) <= bound
    assert rel(out, ref) <= 2.5 * rel(sdpa, ref) + 1e-4
    return out, ref


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_across_blocks(causal):
    check(*qkv(), causal=causal)


@pytest.mark.parametrize("q_len,k_len", [(1, 50), (7, 50), (50, 20), (33, 33)])
@pytest.mark.parametrize("causal", [False, True])
def test_cross_and_decode_lengths(q_len, k_len, causal):
    """Top-left aligned causal with Sq != Sk, decode (one query), and a last block shorter than the others."""
    check(*qkv(q_len=q_len, k_len=k_len), causal=causal)


def test_grouped_query_heads_and_value_dim():
    check(*qkv(q_heads=8, kv_heads=2, v_dim=16), causal=True)
    check(*qkv(q_heads=6, kv_heads=3), scale=0.3)


@pytest.mark.parametrize("shape", [(2, 1, 1, 40), (40, 40), (2, 4, 40, 40), (2, 1, 40, 1)])
def test_bool_masks_that_broadcast(shape):
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(shape, generator=gen) > 0.3
    if shape[-1] > 1:
        mask[..., 0] = True  # every row keeps a key (a [.., Sq, 1] mask leaves some rows none: zeros)
    check(*qkv(), mask=mask)
    check(*qkv(), mask=mask, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_heads_with_a_mask_per_query_head(causal):
    """Scores of a GQA block are laid out [B, Hkv, group·rows, Sk]: the mask of query head h must land on h."""
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 8, 40, 40, generator=gen) > 0.5
    mask[:, 3] = False  # one query head sees nothing: only that head's output is zero
    mask[:, 3, :, 0] = True
    mask[:, 3, :20, 0] = False
    out, _ = check(*qkv(q_heads=8, kv_heads=2), mask=mask, causal=causal)
    assert (out[:, 3, :20] == 0).all() and (out[:, 2, :20] != 0).any()
    check(*qkv(q_heads=8, kv_heads=2), mask=torch.randn(2, 8, 40, 40, generator=gen), causal=causal)


def test_empty_batch_and_no_keys():
    q, k, v = (t.to(BF16) for t in qkv(batch=0))
    assert blocked_attention(q, k, v).shape == (0, 4, 40, 32)
    q, k, v = (t.to(BF16) for t in qkv(k_len=0))
    assert (blocked_attention(q, k, v) == 0).all()


def test_large_logits_stay_within_twice_sdpa_error():
    """Scores rounded to bf16 cost more as the logits grow (std 16 here): held to 2.5x bf16 SDPA's error."""
    q, k, v = qkv(q_len=64, k_len=64)
    check(q * 4, k * 4, v, causal=True, bound=5e-2)


def test_float_padding_mask():
    mask = torch.zeros(2, 1, 1, 40)
    mask[1, ..., -11:] = float("-inf")
    mask[0, ..., :5] = -3.0
    check(*qkv(), mask=mask)
    check(*qkv(q_heads=8, kv_heads=2), mask=mask, causal=True)


@pytest.mark.parametrize("shape", [(), (40,), (1, 40), (1, 1, 40), (2, 1, 1, 40)])
def test_padding_masks_added_as_the_gemms_bias(shape):
    """A float mask that varies by key only (any rank, 0-D and 1-D too, which the reference takes as [1, Sk]) is
    the score GEMM's bias; a batch with every key at -inf is
    dead (zeros), the other batch is not."""
    gen = torch.Generator().manual_seed(7)
    mask = torch.randn(shape, generator=gen)
    check(*qkv(), mask=mask)
    check(*qkv(q_heads=8, kv_heads=2), mask=mask, causal=True)
    if len(shape) == 4:
        mask[1] = float("-inf")
        out, _ = check(*qkv(), mask=mask.clone().fill_(0).masked_fill(mask == float("-inf"), float("-inf")))
        assert (out[1] == 0).all() and (out[0] != 0).any()


def test_padding_masks_take_the_bias_path_and_kill_left_padded_causal_rows(monkeypatch):
    """Key-only masks reach the score GEMM as its bias (no separate add); under causal, a -inf on key 0 (left
    padding) leaves query 0 no key: zeros there, the other rows as the reference."""
    biases = []
    real = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda bias, *a, **kw: biases.append(kw.get("beta", 1)) or real(bias, *a, **kw))
    mask = torch.zeros(2, 1, 1, 40)
    mask[:, ..., 0] = float("-inf")
    out, _ = check(*qkv(), mask=mask, causal=True)
    assert biases and all(beta == 1 for beta in biases), "the mask was not the GEMM's bias"
    assert (out[:, :, 0] == 0).all() and torch.isfinite(out).all()
    biases.clear()
    check(*qkv(q_len=1, k_len=40), mask=torch.randn(1, 40))  # decode with a bias
    assert biases == [1]


def test_scores_ignore_the_uninitialized_buffer(monkeypatch):
    """Without a bias the score GEMM runs with beta=0 on a fresh buffer: whatever it holds (NaN here) never
    reaches the output."""
    real = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: real(self, *a, **kw).fill_(float("nan")))
    out, _ = check(*qkv(), causal=True)
    assert torch.isfinite(out).all()


def test_rows_with_every_key_masked_are_zero():
    q, k, v = qkv()
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool)
    mask[0, :, 3] = False  # query 3 of batch 0 may attend nothing
    mask[1, :, 20:, :] = False  # a whole block of batch 1
    out, ref = check(q, k, v, mask=mask)
    assert (out[0, :, 3] == 0).all() and (out[1, :, 20:] == 0).all()
    float_mask = torch.zeros(2, 1, 40, 40).masked_fill(~mask, float("-inf"))
    out, _ = check(q, k, v, mask=float_mask)
    assert (out[0, :, 3] == 0).all()
    causal_dead = torch.ones(40, 40, dtype=torch.bool)
    causal_dead[5, :6] = False  # under causal, query 5 keeps only keys <= 5: all masked here
    out, _ = check(q, k, v, mask=causal_dead, causal=True)
    assert (out[:, :, 5] == 0).all()


def test_a_finite_mask_over_a_whole_row_is_a_shift_not_a_dead_row():
    """BERT's additive mask is -10000, not -inf: a row with every key so masked is shifted, not dead (softmax
    ignores the constant), and adding -10000 to bf16 scores (spacing 64 there) must not round the scores away."""
    q, k, v = qkv()
    mask = torch.zeros(2, 1, 40, 40)
    mask[0, :, 3] = -10000.0
    mask[1, :, :, 30:] = -10000.0  # the usual case too: some keys masked in every row
    out, ref = check(q, k, v, mask=mask, bound=5e-3)
    unmasked = attention_reference(q, k, v)[0, :, 3]  # the row as if nothing were masked
    assert float((out[0, :, 3].float() - unmasked).norm() / unmasked.norm()) < 1e-2
    mask[0, :, 3] = -1e9  # so large that fp32 loses the scores too: both average the values, as eager fp32 does
    out, ref = check(q, k, v, mask=mask, bound=5e-3)
    uniform = v[0].mean(dim=1)
    assert float((out[0, :, 3].float() - uniform).norm() / uniform.norm()) < 1e-2


def test_nan_in_inputs_is_not_hidden():
    q, k, v = (t.to(BF16) for t in qkv())
    q[0, 0, 3, 0] = float("nan")
    out = blocked_attention(q, k, v, None, None, False)
    assert torch.isnan(out[0, 0, 3]).all() and torch.isfinite(out[1]).all()


def test_bad_inputs_named():
    q, k, v = (t.to(BF16) for t in qkv())
    with pytest.raises(Exception, match="head_dim"):
        blocked_attention(q, k[..., :8], v)


def test_dispatch_on_cpu(monkeypatch):
    """Without the native kernel, the op on bf16 CPU tensors runs this kernel where it is the faster, the reference
    otherwise (and for fp32)."""
    monkeypatch.setenv("BLADE_NATIVE_ATTENTION", "0")
    calls = []
    real = attention_blocked.blocked_attention
    monkeypatch.setattr(attention_blocked, "blocked_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    long_q, long_k, long_v = (t.to(BF16) for t in qkv(q_len=200, k_len=200))
    FLASH_ATTENTION(long_q, long_k, long_v, None, None, True)
    assert calls == [long_q.shape]
    short = [t.to(BF16) for t in qkv(q_len=64, k_len=64)]
    assert not prefers_blocked(short[0], short[1], None, True)
    assert torch.equal(FLASH_ATTENTION(*short, None, None, True), registry.flash_attention(*short, None, None, True))
    fp32 = qkv(q_len=200, k_len=200)
    assert torch.equal(FLASH_ATTENTION(*fp32, None, None, True), attention_reference(*fp32, None, None, True))
    assert len(calls) == 1
