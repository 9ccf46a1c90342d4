"""The Triton quantized GEMMs (blade.backends.kernels.qgemm_triton) against blade::qlinear's reference.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported) on CPU tensors; with CUDA the same tests run on the GPU, plus the `gpu`-marked ones at real
sizes in fp16/bf16/fp32. Every floating buffer torch.empty hands out is poisoned with NaN, so an output
element or row scale the kernels forget to write fails the NaN check. The end-to-end tests compile a
small MLP with backend="triton" and each quantize mode: the interpreted program runs its qlinear nodes
through the kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import blade  # noqa: E402
from blade.errors import ShapeError  # noqa: E402
from blade.ops.quantized import (FP8_MAX, INT8_MAX, QLINEAR, qlinear_reference, quantize_rows,  # noqa: E402
                                 quantize_weight)
from blade.backends.kernels import qgemm_triton as qgemm, registry  # noqa: E402
from blade.backends.kernels.qgemm_triton import qlinear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MODES = ("weight_only", "dynamic", "static", "fp8")
# relative error vs the reference with fp32 x: int8 products are exact, fp8 ones too (e4m3 x e4m3 fits fp32)
TOL = {"weight_only": 1e-5, "dynamic": 1e-5, "static": 1e-5, "fp8": 1e-3}
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP8_OK = not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (8, 9)
needs_fp8 = pytest.mark.skipif(not FP8_OK, reason="fp8 tensors and dots need sm_89+ in Triton")
interpreted = pytest.mark.skipif(not INTERPRETED, reason="the program routes qlinear to the kernels itself only "
                                 "under TRITON_INTERPRET=1 (on CUDA the op runs its registered kernel)")


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """torch.empty returns NaN-filled floating tensors: unwritten outputs and row scales cannot pass."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLADE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh inputs per test, reproducible per test."""
    return torch.Generator().manual_seed(sum(map(ord, request.node.nodeid)) % (2 ** 31))


def rel_err(got, want) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert not got.isnan().any(), "NaN never passes"
    return float(torch.linalg.norm(got - want) / max(float(torch.linalg.norm(want)), 1e-30))


def layer(gen, N, K, mode, bias=True, device=DEVICE):
    """(weight_q, weight_scale, bias) of a random linear layer quantized per output channel."""
    w_q, w_scale = quantize_weight(torch.randn(N, K, generator=gen), mode)
    b = torch.randn(N, generator=gen) if bias else None
    return w_q.to(device), w_scale.to(device), None if b is None else b.to(device)


def static_scale(x) -> float:
    """A calibrated-looking scale that clips the largest values of x (exercises the clamp)."""
    return float(x.abs().max()) * 0.7 / INT8_MAX


# --------------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(gen, mode, rows, bias):
    if mode == "fp8" and not FP8_OK:
        pytest.skip("fp8 tensors and dots need sm_89+ in Triton")
    K, N = 40, 24  # neither a multiple of the 16-wide interpreter tiles: every tail is masked
    shape = (11, 3, K) if rows == 33 else (rows, 1, K)  # 3-D x, M rows in all
    x = torch.randn(*shape, generator=gen).to(DEVICE)
    scale = static_scale(x) if mode == "static" else None
    if rows > 1:
        x[-1, -1] = 0.0  # a row of zeros: s = 0 (dynamic/fp8), y = bias
    w_q, w_scale, b = layer(gen, N, K, mode, bias)
    out = qlinear(x, w_q, w_scale, b, mode, scale)
    want = qlinear_reference(x, w_q, w_scale, b, mode, scale)
    assert out.shape == (*shape[:-1], N) and out.dtype == x.dtype
    assert rel_err(out, want) <= TOL[mode]
    if rows > 1:
        assert torch.equal(out[-1, -1], b if bias else torch.zeros_like(out[-1, -1]))


@pytest.mark.parametrize("mode", ["dynamic", "static", pytest.param("fp8", marks=needs_fp8)])
def test_all_zero_input_gives_the_bias(gen, mode):
    w_q, w_scale, b = layer(gen, 24, 40, mode)
    x = torch.zeros(3, 40, device=DEVICE)
    out = qlinear(x, w_q, w_scale, b, mode, 0.05)
    assert torch.equal(out, b.expand(3, 24))


def _identity(K, mode):
    """An identity weight with unit scales: y = x_q * s, the quantized activation itself."""
    dtype = torch.float8_e4m3fn if mode == "fp8" else torch.int8
    return torch.eye(K).to(dtype).to(DEVICE), torch.ones(K, device=DEVICE)


def test_int8_rounding_is_half_to_even_and_clamped():
    """Rows headed by 127 have s = 1, so x_q = round(x): every .5 tie in [-127, 127] must go to the even side."""
    ties = torch.arange(-127, 127, dtype=torch.float32) + 0.5  # 254 ties
    x = torch.cat([ties, torch.tensor([126.4, -126.6])]).reshape(4, 64)
    x[:, 0] = 127.0
    out = qlinear(x.to(DEVICE), *_identity(64, "dynamic"), None, "dynamic")
    want, scale = quantize_rows(x, "dynamic")
    assert torch.equal(scale, torch.ones(4, 1))
    assert torch.equal(out.cpu(), want) and torch.equal(want, torch.round(x))
    # static: the given scale, then the clamp to [-127, 127]
    x3 = x.to(DEVICE) * 3
    out = qlinear(x3, *_identity(64, "static"), None, "static", 2.0)
    assert torch.equal(out, qlinear_reference(x3, *_identity(64, "static"), None, "static", 2.0))
    assert float(out.abs().max()) == 2.0 * INT8_MAX


@needs_fp8
def test_fp8_rounding_matches_torch_on_every_value_and_midpoint(gen):
    """Rows headed by 448 have s = 1, so x_8 = e4m3(x): every finite e4m3 value, every midpoint between
    neighbours (ties to even), subnormals and random values round as torch's conversion does."""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    extra = torch.cat([torch.rand(100, generator=gen) * 0.03 - 0.015, torch.randn(100, generator=gen) * 100])
    values = torch.cat([grid, mids, extra.clamp(-FP8_MAX, FP8_MAX)])
    values = torch.cat([values, torch.zeros(-values.numel() % 63)]).reshape(-1, 63)
    x = torch.cat([torch.full((values.shape[0], 1), FP8_MAX), values], dim=1)
    out = qlinear(x.to(DEVICE), *_identity(64, "fp8"), None, "fp8")
    want, scale = quantize_rows(x, "fp8")
    assert torch.equal(scale, torch.ones(len(x), 1))
    assert torch.equal(out.cpu(), want)


def test_half_precision_input(gen):
    """fp16 x (the interpreter's bf16 conversions truncate, so bf16 is checked on the GPU only)."""
    for mode in MODES if FP8_OK else MODES[:-1]:
        w_q, w_scale, b = layer(gen, 24, 40, mode)
        x = torch.randn(7, 40, generator=gen).to(DEVICE, torch.float16)
        out = qlinear(x, w_q, w_scale, b, mode, 0.02)
        assert out.dtype == torch.float16
        assert rel_err(out, qlinear_reference(x, w_q, w_scale, b, mode, 0.02)) <= 2e-3


def test_strided_input_and_weight(gen):
    """x read through its row stride (a slice), x with a non-unit last stride (copied), a transposed weight."""
    w_q, w_scale, b = layer(gen, 24, 40, "dynamic")
    x = torch.randn(6, 80, generator=gen).to(DEVICE)[:, :40]
    assert rel_err(qlinear(x, w_q, w_scale, b), qlinear_reference(x, w_q, w_scale, b)) <= 1e-5
    x = torch.randn(40, 6, generator=gen).to(DEVICE).t()
    assert rel_err(qlinear(x, w_q, w_scale, b), qlinear_reference(x, w_q, w_scale, b)) <= 1e-5
    w_t = w_q.t().contiguous().t()  # [N, K] with K strided
    assert rel_err(qlinear(x, w_t, w_scale, b), qlinear_reference(x, w_q, w_scale, b)) <= 1e-5


def test_empty_rows(gen):
    w_q, w_scale, b = layer(gen, 24, 40, "dynamic")
    assert qlinear(torch.zeros(0, 3, 40, device=DEVICE), w_q, w_scale, b).shape == (0, 3, 24)


def test_config_path_without_autotuning(gen):
    """_forward's explicit config (used by tests and benchmarks) takes other tile sizes."""
    w_q, w_scale, b = layer(gen, 24, 40, "dynamic")
    x = torch.randn(21, 40, generator=gen).to(DEVICE)
    out = qgemm._forward(x, w_q, w_scale, b, "dynamic", None, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, GROUP_M=1))
    assert rel_err(out, qlinear_reference(x, w_q, w_scale, b)) <= 1e-5


@pytest.mark.parametrize("make, error, words", [
    (lambda: (torch.zeros(2, 40), torch.zeros(24, 40), torch.ones(24), None, "dynamic", None), ShapeError, "int8"),
    (lambda: (torch.zeros(2, 40), torch.zeros(24, 40, dtype=torch.int8), torch.ones(24), None, "fp8", None),
     ShapeError, "float8"),
    (lambda: (torch.zeros(2, 41), torch.zeros(24, 40, dtype=torch.int8), torch.ones(24), None, "dynamic", None),
     ShapeError, "41 features"),
    (lambda: (torch.zeros(2, 40), torch.zeros(24, 40, dtype=torch.int8), torch.ones(24), None, "int4", None),
     ShapeError, "mode"),
    (lambda: (torch.zeros(2, 40, dtype=torch.float64), torch.zeros(24, 40, dtype=torch.int8), torch.ones(24), None,
              "dynamic", None), ShapeError, "float64"),
    (lambda: (torch.zeros(2, 40), torch.zeros(24, 40, dtype=torch.int8), torch.ones(24), None, "static", None),
     ShapeError, "input_scale"),
], ids=["weight-dtype", "fp8-weight", "features", "mode", "float64", "static-scale"])
def test_invalid_arguments_raise(make, error, words):
    x, w, s, b, mode, scale = make()
    with pytest.raises(error, match=words):
        qlinear(x.to(DEVICE), w.to(DEVICE), s.to(DEVICE), b, mode, scale)


def test_what_the_op_does_not_take_is_refused_by_kernel_and_reference(gen):
    w_q, w_scale, b = layer(gen, 24, 40, "dynamic")
    x = torch.randn(3, 40, generator=gen, dtype=torch.float64).to(DEVICE)
    assert not qgemm.supports(x, w_q, w_scale, b)
    for run in (registry.qlinear, qlinear_reference):
        with pytest.raises(ShapeError, match="float64"):
            run(x, w_q, w_scale, b)
    assert qgemm.supports(x.float(), w_q, w_scale, b)


def test_the_op_runs_a_registered_kernel(gen):
    """blade::qlinear hands its arguments (positionally) to the device's override in the kernel registry."""
    w_q, w_scale, b = layer(gen, 24, 40, "static")
    x = torch.randn(4, 40, generator=gen).to(DEVICE)
    calls = []

    def kernel(*args):
        calls.append(len(args))
        return qgemm.qlinear(*args)

    with registry.override("qlinear", DEVICE, kernel):
        out = QLINEAR(x, w_q, w_scale, b, mode="static", input_scale=0.01)
    assert calls == [6]
    assert rel_err(out, qlinear_reference(x, w_q, w_scale, b, "static", 0.01)) <= 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour of the registry")
def test_without_cuda_the_registry_offers_no_cuda_kernel():
    assert registry.candidates("qlinear", "cuda") == []
    assert not registry.runs("qlinear", "cuda", "triton")


# ----------------------------------------------------------------------------------------- end to end
COMPILE_MODES = ("int8_weight_only", "int8_dynamic", "int8_static", "fp8")


def _mlp(gen):
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.GELU(), torch.nn.Linear(24, 16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@interpreted
@pytest.mark.parametrize("quantize", COMPILE_MODES)
def test_compiled_model_runs_the_kernels(gen, quantize, monkeypatch):
    model = _mlp(gen)
    x = torch.randn(5, 40, generator=gen)
    extra = {"calibration_data": [(torch.randn(5, 40, generator=gen),) for _ in range(3)]} \
        if quantize == "int8_static" else {}
    cm = blade.compile(model, (x,), backend="triton", quantize=quantize, cache=False, **extra)
    details = cm.report.backend_details
    assert cm.backend == "triton" and details["qgemm_nodes"] == 2
    launched = []
    real_forward = qgemm._forward

    def spy(*args, **kwargs):
        launched.append(args[4])
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(qgemm, "_forward", spy)
    x2 = torch.randn(5, 40, generator=gen)  # fresh inputs
    with torch.no_grad():
        want = model(x2)
    got = cm(x2)
    mode = quantize.replace("int8_", "")
    assert launched == [mode, mode]
    assert got.shape == want.shape and not got.isnan().any()
    assert float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)) >= 0.99


@interpreted
def test_program_without_qlinear_counts_none(gen):
    cm = blade.compile(_mlp(gen), (torch.randn(2, 40, generator=gen),), backend="triton", cache=False)
    assert cm.report.backend_details["qgemm_nodes"] == 0


# ----------------------------------------------------------------------------------------------------- GPU
GPU_SHAPES = [(1, 4096, 4096), (77, 1000, 520), (1024, 2048, 1536)]  # (M, K, N): decode, ragged, prefill
GPU_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("mode", MODES)
def test_gpu_matches_reference(gen, mode, dtype):
    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 dots need sm_89+")
    for M, K, N in GPU_SHAPES:
        w_q, w_scale, b = layer(gen, N, K, mode, device="cuda")
        x = torch.randn(M, K, generator=gen).to("cuda", dtype)
        scale = static_scale(x.float()) if mode == "static" else None
        out = qlinear(x, w_q, w_scale, b, mode, scale)
        want = qlinear_reference(x, w_q, w_scale, b, mode, scale)
        tol = max(GPU_TOL[dtype], TOL[mode])
        if mode == "weight_only" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
            tol = 5e-3
        assert out.dtype == dtype and out.shape == (M, N)
        assert rel_err(out, want) <= tol, (M, K, N)


@pytest.mark.gpu
@requires_cuda
def test_gpu_the_registry_routes_the_op(gen):
    assert registry.runs("qlinear", "cuda", "triton")
    w_q, w_scale, b = layer(gen, 512, 768, "dynamic", device="cuda")
    x = torch.randn(3, 9, 768, generator=gen).to("cuda", torch.float16)
    assert registry.choose("qlinear", "cuda", x, w_q, w_scale, b, "dynamic", None).name == "triton"
    out = QLINEAR(x, w_q, w_scale, b, mode="dynamic")
    assert rel_err(out, qlinear_reference(x, w_q, w_scale, b)) <= 2e-3


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("quantize", COMPILE_MODES)
def test_gpu_compiled_model(gen, quantize):
    if quantize == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 dots need sm_89+")
    assert registry.runs("qlinear", "cuda", "triton")
    model = _mlp(gen).cuda()
    x = torch.randn(5, 40, generator=gen).cuda()
    extra = {"calibration_data": [(torch.randn(5, 40, generator=gen).cuda(),) for _ in range(3)]} \
        if quantize == "int8_static" else {}
    cm = blade.compile(model, (x,), backend="triton", quantize=quantize, cache=False, **extra)
    assert cm.report.backend_details["qgemm_nodes"] == 2
    with torch.no_grad():
        want = model(x)
    got = cm(x)
    assert float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)) >= 0.99
