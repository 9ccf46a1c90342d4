"""The Triton flash-attention kernel against blade::flash_attention's reference (float64).

Without CUDA the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported) on CPU tensors; with CUDA the same tests run on the GPU, plus the `gpu`-marked ones at
real sizes. Every buffer torch.empty / Tensor.new_empty hands out is poisoned with NaN, so an element the
kernel forgets to write fails the finiteness check.
"""
import inspect
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from blade.errors import InputError, ShapeError  # noqa: E402
from blade.ops.attention import FLASH_ATTENTION, attention_reference, empty_output  # noqa: E402
from blade.backends.kernels import attention_triton as attention, registry  # noqa: E402
from blade.backends.kernels.attention_triton import flash_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """torch.empty and Tensor.new_empty return NaN-filled floating tensors: unwritten output elements cannot pass."""
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poisoned(real_empty(*args, **kwargs)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *args, **kwargs: poisoned(
        real_new_empty(self, *args, **kwargs)))


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh inputs per test, reproducible per test."""
    return torch.Generator().manual_seed(sum(map(ord, request.node.nodeid)) % (2 ** 31))


def randn(gen, *shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def qkv(gen, B, Hq, Hkv, Sq, Sk, D, Dv=None, dtype=torch.float32, device=DEVICE):
    return (randn(gen, B, Hq, Sq, D, dtype=dtype, device=device), randn(gen, B, Hkv, Sk, D, dtype=dtype, device=device),
            randn(gen, B, Hkv, Sk, Dv or D, dtype=dtype, device=device))


def reference(q, k, v, mask=None, scale=None, causal=False, dtype=torch.float64):
    """The op's reference on the same values, upcast (float64 on CPU; fp32 suffices against fp16 on GPU)."""
    up = [t.to(dtype) for t in (q, k, v)]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    return attention_reference(*up, mask=mask, scale=scale, causal=causal)


def check(out, q, k, v, mask=None, scale=None, causal=False, tol=None, ref_dtype=torch.float64):
    B, Hq, Sq, _ = q.shape
    assert out.shape == (B, Hq, Sq, v.shape[-1]) and out.dtype == q.dtype
    assert out.stride() == empty_output(q, v).stride(), "not in the op's output layout"
    assert torch.isfinite(out).all(), "output has NaN/inf (an element never written, or a masked row gone wrong)"
    ref = reference(q, k, v, mask, scale, causal, ref_dtype)
    err = ((out.to(ref.dtype) - ref).norm() / ref.norm()).item()
    assert err < (tol or TOL[q.dtype]), f"relative error {err:.3g}"  # NaN fails too
    return err


# (B, Hq, Hkv, Sq, Sk, D): ragged lengths (not multiples of the block), Sq != Sk both ways, GQA, MQA, odd D.
CASES = [
    (1, 2, 2, 5, 13, 8),
    (1, 2, 2, 13, 5, 32),
    (2, 2, 2, 37, 37, 64),
    (1, 4, 2, 33, 47, 32),
    (2, 4, 1, 19, 40, 16),
    (1, 2, 2, 20, 35, 80),
    (1, 1, 1, 1, 17, 32),
    (1, 2, 1, 17, 1, 128),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_reference(gen, case, causal):
    B, Hq, Hkv, Sq, Sk, D = case
    q, k, v = qkv(gen, B, Hq, Hkv, Sq, Sk, D)
    check(flash_attention(q, k, v, causal=causal), q, k, v, causal=causal)


@pytest.mark.parametrize("block_m, block_n", [(32, 16), (16, 32), (64, 32)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_block_shapes(gen, block_m, block_n, causal):
    """Other tile shapes than the interpreter's default: the off-diagonal / diagonal split must hold for each."""
    q, k, v = qkv(gen, 1, 4, 2, 70, 83, 32)
    mask = torch.rand(70, 83, generator=gen).to(DEVICE) > 0.2
    for m in (None, mask):
        out = attention._forward(q, k, v, m, None, causal, config={"BLOCK_M": block_m, "BLOCK_N": block_n})
        check(out, q, k, v, m, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", ["b11k", "qk", "bhqk"])
def test_additive_mask(gen, shape, causal):
    B, H, Sq, Sk = 2, 2, 21, 35
    q, k, v = qkv(gen, B, H, H, Sq, Sk, 32)
    mask = randn(gen, *{"b11k": (B, 1, 1, Sk), "qk": (Sq, Sk), "bhqk": (B, H, Sq, Sk)}[shape])
    mask[..., 3] = float("-inf")
    check(flash_attention(q, k, v, mask, causal=causal), q, k, v, mask, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", ["b1qk", "qk", "b11k"])
def test_bool_mask(gen, shape, causal):
    B, Hq, Hkv, Sq, Sk = 2, 4, 2, 23, 30
    q, k, v = qkv(gen, B, Hq, Hkv, Sq, Sk, 16)
    mask = torch.rand(*{"b1qk": (B, 1, Sq, Sk), "qk": (Sq, Sk), "b11k": (B, 1, 1, Sk)}[shape], generator=gen) > 0.3
    mask[..., 0] = True  # no row fully masked here: that is the next test
    mask = mask.to(DEVICE)
    check(flash_attention(q, k, v, mask, causal=causal), q, k, v, mask, causal=causal)


def test_strided_masks(gen):
    """Masks that are views (a transpose, a slice) are read through their strides."""
    B, H, Sq, Sk = 1, 2, 19, 27
    q, k, v = qkv(gen, B, H, H, Sq, Sk, 16)
    bool_mask = (torch.rand(Sk, Sq, generator=gen) > 0.3).to(DEVICE).t()
    bool_mask[:, 0] = True
    float_mask = randn(gen, B, H, Sq, 2 * Sk)[..., ::2]
    for mask in (bool_mask, float_mask):
        assert not mask.is_contiguous()
        check(flash_attention(q, k, v, mask, causal=True), q, k, v, mask, causal=True)


@pytest.mark.parametrize("kind", ["bool", "float", "bool+causal"])
def test_fully_masked_rows_are_zeros(gen, kind):
    B, H, Sq, Sk = 1, 2, 20, 37
    q, k, v = qkv(gen, B, H, H, Sq, Sk, 32)
    allowed = torch.rand(B, H, Sq, Sk, generator=gen) > 0.3
    allowed[..., 1] = True
    dead = [(0, 0, 3), (0, 1, 17), (0, 1, 19)]
    for b, h, i in dead:
        allowed[b, h, i] = False
    causal = kind == "bool+causal"
    if causal:  # row 0 may only see key 0: masking key 0 kills it under causal alone
        allowed[0, 0, 0, 0] = False
        dead.append((0, 0, 0))
    allowed = allowed.to(DEVICE)
    mask = allowed if kind != "float" else torch.zeros(allowed.shape, device=DEVICE).masked_fill(~allowed, float("-inf"))
    out = flash_attention(q, k, v, mask, causal=causal)
    assert torch.isfinite(out).all()
    live = torch.ones(B, H, Sq, dtype=torch.bool)
    for b, h, i in dead:
        assert torch.equal(out[b, h, i], torch.zeros_like(out[b, h, i])), (b, h, i)
        live[b, h, i] = False
    ref = reference(q, k, v, mask, causal=causal)
    live = live.to(DEVICE)
    err = ((out.double()[live] - ref[live]).norm() / ref[live].norm()).item()
    assert err < TOL[torch.float32]


@pytest.mark.parametrize("D, Dv", [(8, 8), (32, 32), (64, 64), (80, 80), (32, 16), (256, 256)])
def test_head_dims(gen, D, Dv):
    q, k, v = qkv(gen, 1, 2, 1, 24, 29, D, Dv)
    check(flash_attention(q, k, v, causal=True), q, k, v, causal=True)


def test_non_contiguous_views(gen):
    """q, k, v as the transpose of [B, S, H, D] (read in place), and a k whose last dim is strided."""
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 19, 26, 32
    q = randn(gen, B, Sq, Hq, D).transpose(1, 2)
    k = randn(gen, B, Sk, Hkv, D).transpose(1, 2)
    v = randn(gen, B, Sk, Hkv, D).transpose(1, 2)
    assert not q.is_contiguous() and q.stride(-1) == 1
    check(flash_attention(q, k, v, causal=True), q, k, v, causal=True)
    k_strided = randn(gen, B, Hkv, D, Sk).transpose(2, 3)  # stride(-1) == Sk: copied by the wrapper
    check(flash_attention(q, k_strided, v), q, k_strided, v)


def test_float16(gen):
    q, k, v = qkv(gen, 2, 4, 2, 33, 41, 64, dtype=torch.float16)
    mask = randn(gen, 33, 41, dtype=torch.float16)
    check(flash_attention(q, k, v, mask, causal=True), q, k, v, mask, causal=True)
    check(flash_attention(q, k, v), q, k, v)
    big = torch.zeros(2, 1, 1, 41, device=DEVICE).index_fill_(-1, torch.tensor([0, 7], device=DEVICE), -1e9)
    check(flash_attention(q, k, v, big), q, k, v, big)  # fp32 mask, taken in fp16 as the reference does


@pytest.mark.skipif(INTERPRETED, reason="Triton's interpreter computes tl.dot wrongly on bfloat16 (triton 3.9); "
                                        "bf16 is checked by the gpu tests")
def test_bfloat16(gen):
    q, k, v = qkv(gen, 2, 4, 2, 33, 41, 64, dtype=torch.bfloat16)
    check(flash_attention(q, k, v, causal=True), q, k, v, causal=True)


@pytest.mark.parametrize("scale", [0.3, -0.5, 0.0])
def test_explicit_scale(gen, scale):
    """A given scale replaces 1/sqrt(D); a non-positive one takes the general (not the fast) path."""
    q, k, v = qkv(gen, 1, 2, 2, 17, 23, 32)
    check(flash_attention(q, k, v, scale=scale, causal=True), q, k, v, scale=scale, causal=True)


def test_one_kernel_serves_any_length(gen):
    """Sequence lengths are runtime arguments, not compile-time constants."""
    params = inspect.signature(attention._attn_fwd.fn).parameters
    for name in ("Sq", "Sk", "Hq", "GROUPS"):
        assert "constexpr" not in str(params[name].annotation), name
    for name in ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "CAUSAL"):
        assert "constexpr" in str(params[name].annotation), name
    for Sq, Sk in ((21, 37), (45, 29)):
        q, k, v = qkv(gen, 1, 2, 2, Sq, Sk, 32)
        check(flash_attention(q, k, v, causal=True), q, k, v, causal=True)


@pytest.mark.parametrize("D", [8, 64, 80, 128, 256])
def test_autotune_candidates(D):
    """Few candidates per head dim (autotuning time), each fitting an H100's shared memory in fp16."""
    block_d = max(16, 1 << (D - 1).bit_length())
    kept = attention._prune(attention.gpu_configs(), {"BLOCK_D": block_d}, BLOCK_DV=block_d)
    assert 1 <= len(kept) <= 8
    for c in kept:
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        smem = 2 * (m * block_d + c.num_stages * n * 2 * block_d)  # q tile + pipelined k and v tiles
        assert smem <= 227 * 1024, (D, str(c))


def test_empty_sequences(gen):
    q, k, v = qkv(gen, 1, 2, 2, 0, 7, 16)
    assert flash_attention(q, k, v).shape == (1, 2, 0, 16)
    q, k, v = qkv(gen, 1, 2, 2, 5, 0, 16)
    out = flash_attention(q, k, v)
    assert out.shape == (1, 2, 5, 16) and torch.equal(out, torch.zeros_like(out))  # no key: all masked


def test_through_the_op(gen):
    """Set as the device's override in the kernel registry, blade::flash_attention runs the kernel."""
    q, k, v = qkv(gen, 1, 4, 2, 18, 18, 32)
    mask = torch.rand(18, 18, generator=gen).to(DEVICE) > 0.2
    calls = []

    def kernel(*args):
        calls.append(len(args))
        return flash_attention(*args)

    with registry.override("flash_attention", DEVICE, kernel):
        out = FLASH_ATTENTION(q, k, v, mask, None, True)
    assert calls == [6]
    check(out, q, k, v, mask, causal=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour of the registry")
def test_without_cuda_the_registry_offers_no_cuda_kernel():
    assert registry.candidates("flash_attention", "cuda") == []
    assert not registry.runs("flash_attention", "cuda", "triton")
    assert registry.describe("flash_attention", "cuda") == "the reference (PyTorch's scaled_dot_product_attention)"


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("args, error, words", [
    ((_t(2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 4)), ShapeError, r"\bq must be 4-D"),
    ((_t(1, 2, 3, 4), _t(1, 2, 3), _t(1, 2, 3, 4)), ShapeError, r"\bk must be 4-D"),
    ((_t(1, 2, 3, 4), _t(2, 2, 3, 4), _t(2, 2, 3, 4)), ShapeError, r"batch sizes"),
    ((_t(1, 3, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 4)), ShapeError, r"query heads 3 .*key/value heads 2"),
    ((_t(1, 2, 3, 4), _t(1, 2, 3, 8), _t(1, 2, 3, 8)), ShapeError, r"\bq head_dim 4 != k head_dim 8"),
    ((_t(1, 2, 3, 4), _t(1, 2, 5, 4), _t(1, 2, 6, 4)), ShapeError, r"\bk .* and v .* must share"),
    ((_t(1, 2, 3, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(3, 4)), ShapeError, r"\bmask of shape \(3, 4\)"),
    ((_t(1, 2, 3, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(3, 5, dtype=torch.int32)), ShapeError, r"\bmask must be"),
    ((_t(1, 1, 3, 512), _t(1, 1, 5, 512), _t(1, 1, 5, 512)), ShapeError, r"head_dim 512"),
    ((_t(1, 1, 3, 4, dtype=torch.float64),) * 3, InputError, r"float64"),
    ((_t(1, 1, 3, 4), _t(1, 1, 3, 4, dtype=torch.float16), _t(1, 1, 3, 4)), InputError, r"share a dtype"),
], ids=["q-rank", "k-rank", "batch", "heads", "head-dim", "kv-seq", "mask-shape", "mask-dtype", "too-wide",
        "float64", "mixed-dtypes"])
def test_invalid_arguments_raise(args, error, words):
    with pytest.raises(error, match=words):
        flash_attention(*args)


# ----------------------------------------------------------------------------------------------------- GPU
GPU_CASES = [  # (B, Hq, Hkv, Sq, Sk, D, causal)
    (2, 16, 16, 1024, 1024, 64, False),
    (2, 16, 16, 1024, 1024, 64, True),
    (1, 16, 16, 2048, 2048, 128, True),
    (1, 16, 4, 2048, 2048, 128, False),
    (2, 8, 2, 1000, 1000, 64, True),
    (1, 8, 1, 1000, 1300, 128, False),
    (1, 8, 8, 1300, 1000, 128, True),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "x".join(map(str, c)))
def test_gpu_matches_reference(gen, case, dtype):
    B, Hq, Hkv, Sq, Sk, D, causal = case
    q, k, v = qkv(gen, B, Hq, Hkv, Sq, Sk, D, dtype=dtype, device="cuda")
    check(flash_attention(q, k, v, causal=causal), q, k, v, causal=causal, ref_dtype=torch.float32)



@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_gpu_masks(gen, kind):
    B, Hq, Hkv, S, D = 2, 8, 2, 1000, 64
    q, k, v = qkv(gen, B, Hq, Hkv, S, S, D, dtype=torch.float16, device="cuda")
    if kind == "bool":
        mask = (torch.rand(B, 1, 1, S, generator=gen) > 0.2).cuda()
    else:
        mask = randn(gen, S, S, dtype=torch.float16, device="cuda")
    for causal in (False, True):
        check(flash_attention(q, k, v, mask, causal=causal), q, k, v, mask, causal=causal, ref_dtype=torch.float32)


@pytest.mark.gpu
@requires_cuda
def test_gpu_layouts_and_fp32(gen):
    B, S, H, D = 2, 1024, 16, 128
    q, k, v = (randn(gen, B, S, H, D, dtype=torch.float16, device="cuda").transpose(1, 2) for _ in range(3))
    check(flash_attention(q, k, v, causal=True), q, k, v, causal=True, ref_dtype=torch.float32)
    q, k, v = qkv(gen, 1, 4, 2, 512, 700, 64, device="cuda")  # fp32: full-precision dots unless TF32 is allowed
    check(flash_attention(q, k, v, causal=True), q, k, v, causal=True)


@pytest.mark.gpu
@requires_cuda
def test_gpu_one_compile_serves_two_lengths(gen):
    caches = getattr(attention._attn_fwd, "device_caches", None)
    if caches is None:
        pytest.skip("this triton keeps its kernel cache elsewhere")

    def compiled():
        return sum(len(entry[0]) for entry in caches.values())

    q, k, v = qkv(gen, 1, 8, 8, 1000, 1000, 64, dtype=torch.float16, device="cuda")
    check(flash_attention(q, k, v), q, k, v, ref_dtype=torch.float32)
    before = compiled()
    q, k, v = qkv(gen, 1, 8, 8, 1300, 1300, 64, dtype=torch.float16, device="cuda")  # neither a multiple of 16
    check(flash_attention(q, k, v), q, k, v, ref_dtype=torch.float32)
    assert compiled() == before


@pytest.mark.gpu
@requires_cuda
def test_gpu_the_op_runs_the_kernel(gen):
    assert registry.runs("flash_attention", "cuda", "triton")
    q, k, v = qkv(gen, 1, 8, 2, 300, 300, 64, dtype=torch.float16, device="cuda")
    assert registry.choose("flash_attention", "cuda", q, k, v, None, None, True).name == "triton"
    check(FLASH_ATTENTION(q, k, v, None, None, True), q, k, v, causal=True, ref_dtype=torch.float32)



def test_what_the_kernel_does_not_take_runs_the_reference(gen):
    """The registry's condition for the kernel is its supports(): float64 or huge head dims go to SDPA."""
    q, k, v = qkv(gen, 1, 2, 2, 5, 7, 8, dtype=torch.float64, device="cpu")
    assert not attention.supports(q, k, v)
    assert not registry.kernel("flash_attention", "cuda", "triton").when(attention, q, k, v, None, None, False)
    out = registry.flash_attention(q, k, v, None, None, False)
    check(out, q, k, v, tol=1e-12)
    q32, k32, v32 = (t.float().to(DEVICE) for t in (q, k, v))
    assert attention.supports(q32, k32, v32)
