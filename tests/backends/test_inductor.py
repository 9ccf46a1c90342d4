"""The inductor backend: blade's optimized IR through torch.compile, against eager on fresh inputs."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import blade
from blade import models

from helpers import assert_matches


@pytest.mark.parametrize("name", ["mlp", "bert", "vit"])
def test_zoo_models_match_eager_at_fresh_sizes(name):
    model, example, dims = models.get(name)
    cm = blade.compile(model, example, dynamic_shapes=dims, backend="inductor")
    assert cm.report.accuracy.ok, cm.report
    for seed, sizes in ((1, {"batch": 3}), (2, {"batch": 5})):
        if name == "bert":
            sizes = dict(sizes, seq=11)
        fresh = models.sample_inputs(name, seed=seed, **sizes)
        with torch.no_grad():
            assert_matches(cm(*fresh), model(*fresh), tol=1e-4)


def test_bf16_through_inductor_is_within_the_bound_and_more_accurate_than_casting_the_model():
    model, example, dims = models.get("gpt")
    cm = blade.compile(model, example, dynamic_shapes=dims, backend="inductor", precision="bf16")
    fresh = models.sample_inputs("gpt", seed=3)
    with torch.no_grad():
        ref = model(*fresh)
        cast = model.to(torch.bfloat16)(*fresh).float()
    model.float()
    err = float((cm(*fresh) - ref).norm() / ref.norm())
    assert err <= 1e-2 and err < float((cast - ref).norm() / ref.norm())


def test_measured_auto_times_inductor_and_artifacts_compile_again_on_load(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).eval()
    x = torch.randn(4, 32)
    cm = blade.compile(model, (x,), autotune=True)
    assert "bf16/fp16 graphs only" in cm.report.backend_candidates["inductor"]["skipped"]  # fp32: not tried
    low = blade.compile(model, (x,), autotune=True, precision="bf16")
    assert "ms" in low.report.backend_candidates["inductor"] and "skipped" in low.report.backend_candidates["onnxruntime"]
    forced = blade.compile(model, (x,), backend="inductor")
    forced.save(tmp_path / "m.blade")
    loaded = blade.load(tmp_path / "m.blade")
    assert loaded.backend == "inductor" and torch.allclose(loaded(x), model(x), atol=1e-5)


def test_an_inductor_failure_is_a_backend_error_at_compile_time(monkeypatch):
    from blade.backends import inductor

    def broken(module, dynamic=None, backend=None):
        def run(*tensors):
            raise RuntimeError("C++ compiler not found")
        return run

    monkeypatch.setattr(inductor.torch, "compile", broken)
    with pytest.raises(blade.errors.BackendError, match="inductor.*C\\+\\+ compiler not found.*backend='onnxruntime'"):
        blade.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),), backend="inductor")


def test_fused_regions_do_not_break_the_compiled_graph():
    """Region bodies are built before tracing: one graph, no recompiles, per compiled model."""
    import torch._dynamo

    model, example, dims = models.get("bert")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    cm = blade.compile(model, example, dynamic_shapes=dims, backend="inductor")
    for seed in (1, 2):
        cm(*models.sample_inputs("bert", seed=seed, batch=3, seq=9))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_inductor_generated_modules_are_not_user_code():
    """Inductor loads its kernels as Python modules; they must not change the compile cache's key."""
    from blade.runtime import cache
    from blade.runtime import fingerprint

    skip = tuple(cache._blade_dirs())
    before = fingerprint.user_code_digest(skip=skip)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    blade.compile(model, (torch.randn(3, 8),), backend="inductor")
    assert fingerprint.user_code_digest(skip=skip) == before


def test_a_models_key_is_the_same_before_and_after_the_first_torch_compile_of_a_process():
    """Dynamo patches torch.nn.Module.__init__ at its first compile; a model's digest must not see it (a fresh
    process, where nothing has compiled yet)."""
    script = ("import torch; from blade.runtime.fingerprint import module_digest; m = torch.nn.Linear(4, 4); "
              "before = module_digest(m); torch.compile(torch.nn.Tanh(), backend='inductor')(torch.randn(3)); "
              "print(before == module_digest(m))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "True"


def test_inductor_modules_in_a_cache_directory_of_ones_own_are_not_user_code(monkeypatch, tmp_path):
    """TORCHINDUCTOR_CACHE_DIR elsewhere (a path without Inductor's default mark): its modules are skipped too."""
    from blade.runtime import cache
    from blade.runtime import fingerprint

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "kernels"))
    (tmp_path / "kernels").mkdir()
    generated = tmp_path / "kernels" / "blade_test_generated_module.py"
    generated.write_text("VALUE = 1\n")
    skip = tuple(cache._blade_dirs())
    before = fingerprint.user_code_digest(skip=skip)
    monkeypatch.syspath_prepend(str(tmp_path / "kernels"))
    __import__("blade_test_generated_module")
    try:
        assert fingerprint.user_code_digest(skip=skip) == before
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
        assert fingerprint.user_code_digest(skip=skip) != before, "the same file outside a compiler's directory counts"
    finally:
        sys.modules.pop("blade_test_generated_module", None)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN (mkldnn) GEMMs: x86/ARM CPU builds")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tanh_gelu_reaches_inductor_as_the_op_and_fuses_into_the_gemm(precision):
    """GPT-2's Linear + tanh GELU under symbolic sizes: the GELU runs as the oneDNN GEMM's epilogue (no separate
    kernel), which Inductor does only for its own decomposition of aten.gelu; the output matches eager."""
    from torch._inductor.utils import run_and_get_code

    from blade.target import supports_bf16
    from blade.target import detect

    if precision == "bf16" and not supports_bf16(detect("cpu")):
        pytest.skip("this CPU has no bf16 dot products: bf16 compiles fp32")
    if precision == "fp32" and not torch._C.has_mkl:
        pytest.skip("Inductor packs fp32 linears for oneDNN only on MKL builds")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(64, 32)).eval()
    cm = blade.compile(model, (torch.randn(4, 32),), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},), backend="inductor",
                       precision=precision, cache=False, check_accuracy=False)
    fresh = torch.randn(6, 32) * 4
    with torch.no_grad():
        out, codes = run_and_get_code(cm, fresh)
        assert_matches(out, model(fresh), tol=1e-5 if precision == "fp32" else 1e-2)
    code = "\n".join(codes)
    assert "'gelu'" in code and "'tanh'" in code, "GELU not fused into the GEMM"
    assert not any(f in code.replace("'tanh'", "") for f in ("tanh(", "exp(")), "a separate GELU kernel was generated"


def test_bf16_attention_runs_blades_cpu_kernel_inside_inductor(monkeypatch):
    """Without the native kernel, past SHORT_KEYS keys Inductor keeps blade::flash_attention as the op, whose CPU kernel
    for bf16 is then the blocked one."""
    from blade.backends.kernels import attention_blocked
    from blade.backends.inductor import short_attention

    monkeypatch.setenv("BLADE_NATIVE_ATTENTION", "0")
    calls = []
    real = attention_blocked.blocked_attention
    monkeypatch.setattr(attention_blocked, "blocked_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(attention_blocked, "MIN_KEYS", 16)  # the tiny model's lengths; blocks of 16 queries
    monkeypatch.setattr(attention_blocked, "BLOCK_ROWS", 16)
    monkeypatch.setattr(short_attention, "SHORT_KEYS", 16)
    model, example, dims = models.get("gpt")
    cm = blade.compile(model, models.sample_inputs("gpt", seed=1, seq=40), dynamic_shapes=dims, backend="inductor",
                       precision="bf16", cache=False)
    calls.clear()
    fresh = models.sample_inputs("gpt", seed=4, seq=50)
    with torch.no_grad():
        ref = model(*fresh)
    assert float((cm(*fresh) - ref).norm() / ref.norm()) <= 1e-2
    assert calls and all(shape[2] == 50 for shape in calls)


def test_weights_are_frozen_into_the_compiled_code_and_the_users_setting_is_restored():
    """Inductor freezes only when its config says so at dynamo's trace: blade turns it on around its calls (the
    weights become constants: folded, and on CPU prepacked for oneDNN's GEMM) and leaves the user's value alone."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).eval()
    x = torch.randn(8, 32)
    assert inductor_config.freezing is False
    cm, codes = run_and_get_code(lambda: blade.compile(model, (x,), backend="inductor", precision="bf16", cache=False))
    assert "_frozen_param" in "\n".join(codes)
    assert inductor_config.freezing is False
    with torch.no_grad():
        assert float((cm(x).float() - model(x)).norm() / model(x).norm()) < 1e-2
    inductor_config.freezing = True  # a user's own choice survives blade's calls
    try:
        cm(x)
        assert inductor_config.freezing is True
    finally:
        inductor_config.freezing = False


def test_overlapping_calls_restore_the_setting_after_the_last():
    import torch._inductor.config as inductor_config
    from blade.backends.inductor import _freezing

    first, second = _freezing(), _freezing()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first call ends while the second still runs: freezing stays on
    assert inductor_config.freezing is True
    second.__exit__(None, None, None)
    assert inductor_config.freezing is False
