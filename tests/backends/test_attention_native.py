"""blade's fused bf16 CPU attention kernel (backends/kernels/attention_native.py, attention_bf16.cpp) against the op."""
import threading

import pytest
import torch

from blade.backends.kernels import attention_blocked, attention_native
from blade.ops.attention import FLASH_ATTENTION, attention_reference
from helpers import attention_inputs, finite_relative_error

BF16 = torch.bfloat16

native = pytest.mark.skipif(not attention_native.available(),
                            reason=f"the native kernel does not run here: {attention_native.unavailable_reason()}")


def qkv(**sizes):
    return attention_inputs(**{"dim": 64, **sizes})


rel = finite_relative_error


def check(q, k, v, mask=None, scale=None, causal=False):
    """The kernel on bf16 inputs within 1e-2 of the fp32 reference and no worse than bf16 SDPA's error, in the op's
    output layout."""
    ref = attention_reference(q, k, v, mask, scale, causal)
    low = [t.to(BF16) for t in (q, k, v)]
    assert attention_native.supports(*low, mask)
    out = attention_native.attention(*low, mask, scale, causal)
    assert out.dtype == BF16 and out.shape == ref.shape
    assert out.transpose(1, 2).is_contiguous(), "the op's output memory is [B, Sq, Hq, Dv]"
    sdpa = attention_reference(*low, mask, scale, causal)
    assert rel(out, ref) <= 1e-2
    assert rel(out, ref) <= 1.2 * rel(sdpa, ref) + 1e-4, (rel(out, ref), rel(sdpa, ref))
    return out


@native
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len,k_len", [(1, 1), (1, 77), (33, 33), (40, 17), (17, 40), (100, 100), (257, 257)])
def test_matches_the_reference(q_len, k_len, causal):
    """Lengths around the 16/32-key steps and the 32-query tiles, decode (one query), Sq != Sk (top-left causal)."""
    check(*qkv(q_len=q_len, k_len=k_len), causal=causal)


@native
@pytest.mark.parametrize("dim,v_dim", [(2, 16), (32, 48), (64, 64), (80, 80), (128, 128), (64, 144),
                                       (36, 36), (60, 60), (64, 40), (2, 1), (48, 17), (8, 8)])
def test_head_dims(dim, v_dim):
    check(*qkv(dim=dim, v_dim=v_dim, q_len=20, k_len=50), causal=True)


@native
def test_grouped_query_heads_and_scale():
    check(*qkv(q_heads=8, kv_heads=2, q_len=70, k_len=70), scale=0.3, causal=True)


@native
@pytest.mark.parametrize("shape", [(50,), (1, 50), (2, 1, 1, 50), (1, 1, 1, 50), (1, 1, 50)])
def test_padding_masks_of_every_rank(shape):
    """Additive masks that vary by key only, broadcast over batch or not; -10000 as BERT pads (kept in fp32)."""
    mask = torch.zeros(shape)
    mask[..., -7:] = -10000.0
    check(*qkv(q_len=30, k_len=50), mask=mask)
    check(*qkv(q_len=50, k_len=50, seed=1), mask=mask, causal=True)


@native
def test_masks_that_broadcast_over_keys_and_0d():
    """A mask of one value per batch row or per query ([B, 1, 1, 1], [B, 1, Sq, 1]): -inf there kills the row; a
    0-D mask is one value for everything."""
    q, k, v = (t.to(BF16) for t in qkv(q_len=30, k_len=50))
    per_batch = torch.zeros(2, 1, 1, 1)
    per_batch[1] = float("-inf")
    out = attention_native.attention(q, k, v, per_batch, None, False)
    assert (out[1] == 0).all() and rel(out[:1], attention_reference(*(t[:1].float() for t in (q, k, v)))) <= 1e-2
    per_query = torch.zeros(2, 1, 30, 1)
    per_query[0, 0, 7] = float("-inf")
    out = attention_native.attention(q, k, v, per_query, None, True)
    ref = attention_reference(*(t.float() for t in (q, k, v)), None, None, True)
    assert (out[0, :, 7] == 0).all()
    assert rel(out[1], ref[1]) <= 1e-2 and rel(out[0, :, 8:], ref[0, :, 8:]) <= 1e-2
    check(*qkv(q_len=30, k_len=50), mask=torch.tensor(-3.0))


@native
def test_bool_padding_mask():
    mask = torch.rand(2, 1, 1, 50, generator=torch.Generator().manual_seed(2)) > 0.4
    mask[..., 0] = True
    check(*qkv(q_len=50, k_len=50), mask=mask)


@native
def test_rows_with_no_key_give_zeros_even_with_nan_behind_the_mask():
    """A batch row whose keys are all masked, and causal rows that may only see masked keys, give zeros (the op's
    spec); a NaN in a masked key's score does not leak. Live rows match the reference."""
    q, k, v = (t.to(BF16) for t in qkv(q_len=40, k_len=40))
    mask = torch.zeros(2, 1, 1, 40)
    mask[0] = float("-inf")  # batch 0: nothing left
    mask[1, ..., :5] = float("-inf")  # batch 1 (left padded): causal rows 0-4 see no key
    k[:, :, :5] = float("nan")
    out = attention_native.attention(q, k, v, mask, None, True)
    assert (out[0] == 0).all() and (out[1, :, :5] == 0).all()
    live_ref = attention_reference(q[1:, :, 5:].float(), k[1:, :, 5:].float(), v[1:, :, 5:].float(), None, None, True)
    assert rel(out[1:, :, 5:], live_ref) <= 1e-2


@native
def test_nan_in_a_live_row_stays_nan():
    q, k, v = (t.to(BF16) for t in qkv())
    q[0, 0, 3, 0] = float("nan")
    out = attention_native.attention(q, k, v, None, None, False)
    assert torch.isnan(out[0, 0, 3]).all() and torch.isfinite(out[1]).all() and torch.isfinite(out[0, 1]).all()


@native
def test_strided_views_of_a_fused_projection():
    """q, k, v as the views a fused QKV projection gives (rows contiguous, heads and tokens strided)."""
    fused = torch.randn(2, 45, 3, 4, 64)
    q, k, v = (fused[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    check(q, k, v, causal=True)


@native
def test_per_query_and_per_head_masks():
    """Masks that vary by query (a causal-and-padding bool mask as Hugging Face builds it) and by head, read through
    their broadcast strides; GQA with a per-head mask; a 3-D mask; bool with causal and Sq != Sk; a bf16 mask."""
    gen = torch.Generator().manual_seed(3)
    hf_style = torch.ones(60, 60, dtype=torch.bool).tril().expand(2, 1, 60, 60).clone()
    hf_style[1, ..., :9] = False  # batch 1 left padded: its first 9 rows see no key
    q, k, v = qkv(q_len=60, k_len=60)
    out = attention_native.attention(*(t.to(BF16) for t in (q, k, v)), hf_style, None, False)
    assert (out[1, :, :9] == 0).all()
    ref = attention_reference(q, k, v, hf_style, None, False)
    assert rel(out[:, :, 9:], ref[:, :, 9:]) <= 1e-2
    check(*qkv(q_len=30, k_len=50), mask=torch.randn(1, 4, 30, 50, generator=gen))
    check(*qkv(q_heads=8, kv_heads=2, q_len=30, k_len=50), mask=torch.randn(2, 8, 30, 50, generator=gen))
    check(*qkv(q_len=30, k_len=50), mask=torch.randn(4, 30, 50, generator=gen))
    check(*qkv(q_len=30, k_len=50), mask=torch.rand(30, 50, generator=gen) > 0.1)
    check(*qkv(q_len=20, k_len=45), mask=torch.rand(2, 1, 20, 45, generator=gen) > 0.1, causal=True)
    q, k, v = qkv(q_len=30, k_len=50)
    low_mask = torch.randn(2, 1, 30, 50, generator=gen).to(BF16)
    ref = attention_reference(q, k, v, low_mask.float(), None, False)
    assert rel(attention_native.attention(*(t.to(BF16) for t in (q, k, v)), low_mask, None, False), ref) <= 1e-2


@native
def test_what_it_does_not_take_goes_elsewhere(monkeypatch):
    """Odd head dims, fp32, zero keys, contiguity off the last dim, and BLADE_NATIVE_ATTENTION=0
    are not taken; the op then runs the blocked kernel or the reference, still correctly."""
    q, k, v = (t.to(BF16) for t in qkv(q_len=200, k_len=200))
    assert not attention_native.supports(q[..., :63], k[..., :63], v, None)
    assert attention_native.supports(q, k, v[..., :40], None)  # a value dim off 16: its tail lanes are masked
    assert not attention_native.supports(q.float(), k.float(), v.float(), None)
    assert not attention_native.supports(q, k[:, :, :0], v[:, :, :0], None)
    assert not attention_native.supports(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, None)
    assert not attention_native.supports(q, k, v, torch.zeros(200, device="meta"))
    monkeypatch.setenv("BLADE_NATIVE_ATTENTION", "0")
    assert not attention_native.supports(q, k, v, None)
    monkeypatch.delenv("BLADE_NATIVE_ATTENTION")
    calls = []
    for module, name in ((attention_blocked, "blocked_attention"), (attention_native, "attention")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    fp32 = [t.float() for t in (q, k, v)]
    odd_ref = attention_reference(fp32[0][..., :63], fp32[1][..., :63], fp32[2], None, None, True)
    assert rel(FLASH_ATTENTION(q[..., :63].contiguous(), k[..., :63].contiguous(), v, None, None, True), odd_ref) <= 1e-2
    assert rel(FLASH_ATTENTION(q, k, v, None, None, True), attention_reference(*fp32, None, None, True)) <= 1e-2
    assert calls == ["blocked_attention", "attention"]


@native
def test_bad_inputs_are_named_before_the_kernel_runs():
    q, k, v = (t.to(BF16) for t in qkv())
    with pytest.raises(Exception, match="batch"):
        FLASH_ATTENTION(q, k[:1], v[:1], None, None, False)


@native
def test_concurrent_calls_from_threads_do_not_share_buffers():
    """Each calling thread keeps its own packed K/V: two threads with different shapes get their own answers."""
    cases = [[t.to(BF16) for t in qkv(q_len=n, k_len=n, seed=n)] for n in (64, 300)]
    refs = [attention_native.attention(*c, None, None, True) for c in cases]
    errors = []

    def work(i):
        for _ in range(20):
            if not torch.equal(attention_native.attention(*cases[i], None, None, True), refs[i]):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_a_failed_build_warns_once_and_the_op_still_runs(monkeypatch, tmp_path):
    """No compiler: library() is None with the reason, warned once (not again on later calls); the op still runs, on
    the blocked kernel. Then the real compiler builds into the (new) cache directory."""
    import warnings

    features = attention_native.detect("cpu").features
    if "avx512_bf16" not in features or "amx_bf16" in features:
        pytest.skip("no AVX512-BF16, or AMX: the kernel is not built here at all")
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("BLADE_CACHE_DIR", str(tmp_path))
    attention_native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no-such-compiler-xyz"):
            assert attention_native.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not attention_native.available()
            q, k, v = (t.to(BF16) for t in qkv(q_len=200, k_len=200))
            out = FLASH_ATTENTION(q, k, v, None, None, True)
        assert "no-such-compiler-xyz" in attention_native.unavailable_reason()
        assert rel(out, attention_reference(q.float(), k.float(), v.float(), None, None, True)) <= 1e-2
    finally:
        attention_native.library.cache_clear()
    monkeypatch.delenv("CXX")
    assert attention_native.library() is not None  # built again into tmp_path with the real compiler
    assert list((tmp_path / "native").glob("attention_bf16_*.so"))


class CausalAttentionLayers(torch.nn.Module):
    """Causal attention layers through SDPA (blade's attention pass makes each blade::flash_attention) over one
    projection, one per (heads, head dim) of width 64, summed."""

    def __init__(self, head_shapes=((4, 16),)):
        super().__init__()
        self.head_shapes = head_shapes
        self.qkv = torch.nn.Linear(64, 192)

    def forward(self, x):
        batch, seq, _ = x.shape
        total = 0
        for heads, dim in self.head_shapes:
            q, k, v = self.qkv(x).view(batch, seq, 3, heads, dim).unbind(2)
            out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                   v.transpose(1, 2), is_causal=True)
            total = total + out.transpose(1, 2).reshape(batch, seq, 64)
        return total


@native
def test_inductor_keeps_the_op_for_the_native_kernel_at_every_length(monkeypatch):
    """Through the inductor backend in bf16, attention stays the op (the native kernel runs it) on both sides of
    SHORT_KEYS, with one compile for every length: no guard on the length."""
    import blade
    from blade.backends import inductor
    from torch.export import Dim

    compiles, kernel_calls = [], []
    real_compile = inductor.inductor_with_freezing
    monkeypatch.setattr(inductor, "inductor_with_freezing",
                        lambda gm, inputs: compiles.append("torch.ops.blade.flash_attention" in gm.code)
                        or real_compile(gm, inputs))
    real_kernel = attention_native.attention
    monkeypatch.setattr(attention_native, "attention", lambda *a: kernel_calls.append(a[1].shape[2]) or real_kernel(*a))
    model = CausalAttentionLayers().eval()
    gen = torch.Generator().manual_seed(0)
    cm = blade.compile(model, (torch.randn(2, 12, 64, generator=gen),), dynamic_shapes=({1: Dim("seq")},),
                       backend="inductor", precision="bf16", cache=False, check_accuracy=False)
    kernel_calls.clear()  # blade.compile compiled (and so ran) it once already
    with torch.no_grad():
        for seq in (12, 140, 40):
            x = torch.randn(2, seq, 64, generator=gen)
            assert rel(cm(x), model(x)) <= 1e-2
    assert compiles == [True], compiles
    assert kernel_calls == [12, 140, 40]


@native
def test_thread_count_follows_torch_and_buffers_grow_with_it():
    """A call on one thread, then the same shape on torch's full count (the per-thread buffers grow): same answers."""
    q, k, v = (t.to(BF16) for t in qkv(q_len=100, k_len=100))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention_native.attention(q, k, v, None, None, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(attention_native.attention(q, k, v, None, None, True), one)
    assert rel(one, attention_reference(q.float(), k.float(), v.float(), None, None, True)) <= 1e-2


@native
def test_scores_far_below_the_row_max():
    """Scores spread over hundreds (exp underflows for most keys): still the softmax of the reference."""
    q, k, v = qkv(q_len=40, k_len=60)
    check(q * 12, k, v, causal=True)


@native
def test_inductor_lowers_only_the_nodes_the_native_kernel_does_not_take():
    """Heads of 16 (the native kernel takes them) keep the op; heads of 1 (it does not) become plain ops."""
    import blade

    model = CausalAttentionLayers(((4, 16), (64, 1))).eval()
    gen = torch.Generator().manual_seed(1)
    cm = blade.compile(model, (torch.randn(2, 24, 64, generator=gen),), backend="inductor", precision="bf16",
                       cache=False, check_accuracy=False)
    code = cm.executable.module.code
    assert code.count("attention_for_inductor") == 1 and code.count("blade.flash_attention") == 1, code
    x = torch.randn(2, 24, 64, generator=gen)
    with torch.no_grad():
        assert rel(cm(x), model(x)) <= 1e-2
