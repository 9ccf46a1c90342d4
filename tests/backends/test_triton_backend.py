"""The Triton backend under Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU):
every zoo model against eager at two sizes without recompiling, each fusion kind's kernel against its region's
PyTorch meaning, fallback, buffer plan, kernel cache, save/load, and the refusal without a GPU."""
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch.export import Dim

import blade
import blade.models as zoo
from blade.backends.triton import codegen
from blade.backends.triton import program as triton_program
from blade.backends.triton.codegen import Unsupported, generate
from blade.backends.triton.program import TritonProgram
from blade.ir.fused import is_fused

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the kernels on CPU tensors under TRITON_INTERPRET=1 (set without a GPU)")
on_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    err = float(torch.linalg.norm(got - want) / max(float(torch.linalg.norm(want)), 1e-30))
    assert err == err, "NaN never passes"
    return err


def _flat(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLADE_CACHE_DIR", str(tmp_path / "cache"))


SIZES = {"bert": [dict(batch=1, seq=5), dict(batch=3, seq=17)], "gpt": [dict(batch=1, seq=4), dict(batch=2, seq=19)],
         "gpt_decode": [dict(batch=1, past=3), dict(batch=2, past=9)], "vit": [dict(batch=1), dict(batch=3)],
         "dit": [dict(batch=1), dict(batch=3)], "dlrm": [dict(batch=1), dict(batch=5)],
         "mlp": [dict(batch=1), dict(batch=7)], "resnet": [dict(batch=1), dict(batch=2)]}


@interpreted
@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_matches_eager_at_two_sizes_without_recompiling(name, monkeypatch):
    model, example, dynamic = zoo.get(name)
    cm = blade.compile(model, example, dynamic_shapes=dynamic, backend="triton")
    details = cm.report.backend_details
    assert cm.backend == "triton" and details["kernels"] >= 1 and details["fallback_regions"] == {}
    assert cm.report.accuracy.ok
    loads = []
    monkeypatch.setattr(triton_program, "load_kernel", lambda *a: loads.append(a) or pytest.fail("recompiled"))
    for seed, dims in enumerate(SIZES[name]):
        inputs = zoo.sample_inputs(name, seed=seed + 1, **dims)
        with torch.no_grad():
            want = _flat(model(*inputs))
        got = _flat(cm(*inputs))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape and _rel_err(g, w) <= 1e-4
    assert loads == []


def _region_node(model, example, dynamic=None, pattern=None):
    cm = blade.compile(model, example, dynamic_shapes=dynamic, backend="eager")
    nodes = [n for n in cm.graph.call_nodes if is_fused(n) and (pattern is None or n.target.pattern == pattern)]
    assert nodes, cm.graph
    return cm, nodes[0]


def _check_kernel(region, args):
    program_source = generate(region, "k_test")
    kernel, _ = triton_program.load_kernel(program_source)
    from blade.backends.triton.launcher import RegionKernel

    outputs = list(region.body.outputs)
    launcher = RegionKernel(program_source, kernel, [o.val.dtype for o in outputs], [o.val.rank for o in outputs],
                            region.multiple_outputs, tuned=False)
    got, want = launcher(*args), region(*args)
    for g, w in zip(_flat(got), _flat(want)):
        assert g.shape == w.shape and g.dtype == w.dtype and _rel_err(g, w) <= 1e-5
    return program_source


class _Loop(torch.nn.Module):
    def forward(self, x, mask, scale):
        return (x + scale) * (1.0 - mask.to(torch.float32)) - torch.relu(x) / 3.0


@interpreted
def test_loop_kernel_broadcasts_casts_and_reads_strided_operands():
    x, mask, scale = torch.randn(2, 3, 5), torch.randint(0, 2, (2, 1, 5)), torch.randn(5)
    _, node = _region_node(_Loop(), (x, mask, scale))
    assert node.target.kind == "loop"
    source = _check_kernel(node.target, [x, mask, scale])
    assert "tl.program_id(0).to(tl.int64) * BLOCK" in source.source
    _check_kernel(node.target, [torch.randn(5, 3, 2).transpose(0, 2), mask, scale])  # a non-contiguous operand


class _Norms(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(24)
        self.gain = torch.nn.Parameter(torch.randn(24))

    def forward(self, x, skip):
        h = self.norm(x + skip)
        rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain
        return torch.softmax(rms * 2.0, dim=-1)


@interpreted
def test_reduction_kernels_layer_norm_rms_norm_softmax():
    x, skip = torch.randn(2, 7, 24), torch.randn(2, 7, 24)
    cm = blade.compile(_Norms(), (x, skip), backend="eager")
    regions = [n for n in cm.graph.call_nodes if is_fused(n) and n.target.kind == "reduction"]
    assert len(regions) >= 2, cm.graph
    env = {n: t for n, t in zip(cm.graph.inputs, (x, skip))}
    env.update({n: cm.graph.constants[n.name] for n in cm.graph.constant_nodes})
    for node in cm.graph.call_nodes:  # run the graph node by node; every reduction region through its kernel
        args = [env[a] if isinstance(a, blade.ir.graph.Node) else a for a in node.args]
        if node in regions:
            _check_kernel(node.target, args)
        env[node] = node.target(*args, **node.kwargs)
    model = _Norms().eval()
    triton_cm = blade.compile(model, (x, skip), backend="triton")
    assert triton_cm.report.backend_details["kernel_kinds"]["reduction"] == len(regions)
    with torch.no_grad():
        assert _rel_err(triton_cm(x, skip), model(x, skip)) <= 1e-5


class _Epilogue(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 40)
        self.down = torch.nn.Linear(40, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x))) + x


@interpreted
def test_matmul_epilogue_kernels_with_activation_and_residual():
    model = _Epilogue().eval()
    x = torch.randn(3, 5, 16)
    batch = Dim("batch", min=1, max=16)
    cm = blade.compile(model, (x,), dynamic_shapes=({0: batch},), backend="eager")
    regions = [n for n in cm.graph.call_nodes if is_fused(n) and n.target.kind == "matmul_epilogue"]
    assert {n.target.pattern for n in regions} == {"linear_gelu", "linear_residual"}
    up = regions[0].target
    _check_kernel(up, [x, model.up.weight, model.up.bias])
    residual = [n for n in regions if n.target.pattern == "linear_residual"][0].target
    h = torch.randn(3, 5, 40)
    _check_kernel(residual, [h, model.down.weight, model.down.bias, x])
    triton_cm = blade.compile(model, (x,), dynamic_shapes=({0: batch},), backend="triton")
    for b in (1, 9):  # a dynamic M: the kernel's M is an argument, no recompile
        y = torch.randn(b, 5, 16)
        with torch.no_grad():
            assert _rel_err(triton_cm(y), model(y)) <= 1e-5


@interpreted
def test_unsupported_region_falls_back_to_pytorch_and_is_counted():
    class Odd(torch.nn.Module):  # x ** y of two tensors: fused as a loop, but no translation for it
        def forward(self, x, y):
            return (x.abs() + 1.0) ** y + torch.relu(x)

    x, y = torch.randn(4, 6), torch.randn(4, 6)
    cm = blade.compile(Odd(), (x, y), backend="triton")
    details = cm.report.backend_details
    assert details["fused_regions"] == 1 and details["kernels"] == 0
    (reason,) = details["fallback_regions"].values()
    assert "no Triton translation for aten.pow.Tensor_Tensor" in reason
    torch.testing.assert_close(cm(x, y), Odd()(x, y))
    region_cm = blade.compile(Odd(), (x, y), backend="eager")
    with pytest.raises(Unsupported, match="no Triton translation"):
        generate([n.target for n in region_cm.graph.call_nodes if is_fused(n)][0], "k_odd")


def test_a_bug_in_an_emitter_raises_instead_of_falling_back(monkeypatch):
    class Plain(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2.0 + 1.0

    cm = blade.compile(Plain(), (torch.randn(4, 6),), backend="eager")
    region = next(n.target for n in cm.graph.call_nodes if is_fused(n))
    assert "tl.maximum" in generate(region, "k_plain").source

    def broken(writer, node, operands):
        return {}["a generator bug"]

    monkeypatch.setitem(codegen.EMITTERS, torch.ops.aten.relu.default, broken)
    with pytest.raises(KeyError, match="a generator bug"):
        generate(region, "k_plain")


@interpreted
def test_comparisons_masks_and_activations_translate():
    class Masks(torch.nn.Module):
        def forward(self, x, y):
            keep = (x > 0) & (y <= 0.5)
            z = torch.nn.functional.leaky_relu(x, 0.2).masked_fill(keep, -3.0)
            return torch.where(x != y, torch.nn.functional.hardtanh(z), y), torch.logical_not(keep).to(torch.float32)

    x, y = torch.randn(3, 8), torch.randn(3, 8)
    cm = blade.compile(Masks(), (x, y), backend="triton")
    assert cm.report.backend_details["fallback_regions"] == {} and cm.report.backend_details["kernels"] >= 1
    for got, want in zip(cm(x, y), Masks()(x, y)):
        torch.testing.assert_close(got, want)


@interpreted
def test_buffer_plan_reuses_slots_and_is_thread_safe():
    model, example, dynamic = zoo.get("bert")
    cm = blade.compile(model, example, dynamic_shapes=dynamic, backend="triton")
    details = cm.report.backend_details
    assert 0 < details["slots"] < details["planned_buffers"], details
    inputs = [zoo.sample_inputs("bert", seed=s, batch=1 + s % 3, seq=4 + s) for s in range(4)]
    with torch.no_grad():
        serial = [_flat(cm(*i)) for i in inputs]
    results = {}

    def worker(k):
        results[k] = [_flat(cm(*inputs[(k + r) % 4])) for r in range(3)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2, 3], "a thread failed"
    for k, outs in results.items():
        for r, out in enumerate(outs):
            for got, want in zip(out, serial[(k + r) % 4]):
                assert torch.equal(got, want)


@interpreted
def test_kernel_cache_is_reused_by_a_second_compile():
    model, example, dynamic = zoo.get("gpt")
    first = blade.compile(model, example, dynamic_shapes=dynamic, backend="triton").report.backend_details
    second = blade.compile(model, example, dynamic_shapes=dynamic, backend="triton").report.backend_details
    assert first["kernel_cache"]["written"] == first["kernels"] and second["kernel_cache"] == {
        "hits": second["kernels"], "written": 0}


@interpreted
def test_save_load_and_inspect_source(tmp_path):
    model, example, dynamic = zoo.get("bert")
    cm = blade.compile(model, example, dynamic_shapes=dynamic, backend="triton")
    cm.save(tmp_path / "bert.blade")
    kernels = sorted(p.name for p in (tmp_path / "bert.blade" / "backend" / "kernels").iterdir())
    assert "host_program.py" in kernels and len(kernels) == cm.report.backend_details["kernels"] + 1
    loaded = blade.load(tmp_path / "bert.blade")
    inputs = zoo.sample_inputs("bert", seed=4, batch=2, seq=9)
    for got, want in zip(_flat(loaded(*inputs)), _flat(cm(*inputs))):
        assert torch.equal(got, want)
    shown = subprocess.run([sys.executable, "-m", "blade", "inspect", str(tmp_path / "bert.blade"), "--source"],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "# host program" in shown.stdout and "@triton.jit" in shown.stdout and "tl.dot" in shown.stdout


def test_refused_on_cpu_without_the_interpreter_and_never_auto_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("the CPU refusal")
    code = ("import torch, blade\n"
            "try:\n    blade.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),), backend='triton')\n"
            "except blade.errors.BladeError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "no CUDA GPU; use backend='onnxruntime'" in out.stdout, out.stdout + out.stderr
    cm = blade.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    assert cm.backend == "onnxruntime" and "triton unavailable on cpu" in cm.report.backend_reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["bert", "gpt", "vit", "dit", "dlrm", "mlp"])
@on_gpu[0]
@on_gpu[1]
def test_zoo_on_cuda(name, dtype):
    model, example, dynamic = zoo.get(name)
    model = model.to("cuda", dtype).eval()

    def cast(inputs):
        return tuple(t.to("cuda", dtype) if t.is_floating_point() else t.cuda() for t in inputs)

    cm = blade.compile(model, cast(example), dynamic_shapes=dynamic, backend="triton", cache=False)
    assert cm.backend == "triton" and cm.report.backend_details["kernels"] >= 1
    inputs = cast(zoo.sample_inputs(name, seed=3, **SIZES[name][1]))
    with torch.no_grad():
        want = _flat(model(*inputs))
    for got, ref in zip(_flat(cm(*inputs)), want):
        assert _rel_err(got, ref) <= (1e-4 if dtype == torch.float32 else 1e-2)


@interpreted
def test_review_regressions_views_per_row_outputs_self_residual():
    class ViewThenKernel(torch.nn.Module):  # a kernel output read through a view after another kernel ran
        def forward(self, x):
            a = torch.relu(x * 2 + 1)
            v = a.t()
            b = torch.exp(x * 3 - 1)
            return v + b.sum(), a.t() * 1.0

    class PerRow(torch.nn.Module):
        def forward(self, x):
            return x.amax(-1, keepdim=True) * 2, (x * x).mean(-1) + 1.0

    class SelfResidual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x):
            return torch.relu(self.lin(x)) + x

    for model, x in [(ViewThenKernel(), torch.randn(4, 6)), (PerRow(), torch.randn(2, 3, 5)),
                     (SelfResidual().eval(), torch.randn(3, 16))]:
        cm = blade.compile(model, (x,), backend="triton")
        assert cm.report.backend_details["kernels"] >= 1, type(model).__name__
        first = [t.clone() for t in _flat(cm(x))]
        with torch.no_grad():
            want = _flat(model(x))
        for got, ref in zip(first, want):
            assert got.shape == ref.shape and _rel_err(got, ref) <= 1e-5, type(model).__name__
        kept = _flat(cm(x))
        cm(torch.randn_like(x))  # a later call must not change results already returned
        for got, ref in zip(kept, want):
            assert _rel_err(got, ref) <= 1e-5, type(model).__name__
    doubled = blade.compile(torch.nn.Linear(4, 4).double(), (torch.randn(2, 4, dtype=torch.float64),),
                            backend="triton")
    assert doubled.report.accuracy.ok


@interpreted
def test_half_precision_models_compute_in_float32_and_store_their_dtype():
    reference = _Epilogue().eval()
    model = _Epilogue().eval()
    model.load_state_dict(reference.state_dict())
    model = model.to(torch.float16)
    x = torch.randn(2, 5, 16, dtype=torch.float16)
    cm = blade.compile(model, (x,), backend="triton", check_accuracy=False)
    assert cm.report.backend_details["kernel_kinds"]["matmul_epilogue"] == 2
    got = cm(x)
    with torch.no_grad():
        want = reference(x.float())
    assert got.dtype == torch.float16 and _rel_err(got.float(), want) <= 1e-2


@interpreted
def test_long_rows_are_walked_in_blocks(monkeypatch):
    """Rows longer than one block (forced small here) get the looped row kernel: passes per reduction."""
    from blade.backends.triton import codegen

    monkeypatch.setattr(codegen, "MAX_ROW", 16)
    monkeypatch.setattr(codegen, "LOOP_BLOCK_N", 8)

    class Rows(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(37)

        def forward(self, x, skip):
            h = self.norm(x + skip)
            centered = h - h.mean(-1, keepdim=True)
            return torch.softmax(centered * 3.0, dim=-1), h.amax(-1), centered.var(-1, keepdim=True)

    model = Rows().eval()
    x, skip = torch.randn(2, 3, 37), torch.randn(37)
    cm = blade.compile(model, (x, skip), backend="triton")
    assert cm.report.backend_details["fallback_regions"] == {}
    looped = [s for s in cm.executable.kernels.values() if s.kind == "reduction"]
    assert looped and all(s.looped for s in looped) and all("for c0 in range(0, N, BLOCK_N)" in s.source for s in looped)
    with torch.no_grad():
        want = model(x, skip)
    for got, ref in zip(cm(x, skip), want):
        assert got.shape == ref.shape and _rel_err(got, ref) <= 1e-5


@interpreted
@pytest.mark.parametrize("looped", [False, True])
def test_second_review_regressions_reductions(looped, monkeypatch):
    from blade.backends.triton import codegen

    if looped:
        monkeypatch.setattr(codegen, "MAX_ROW", 4)
        monkeypatch.setattr(codegen, "LOOP_BLOCK_N", 4)

    class SizeOneRow(torch.nn.Module):  # a [B, 1] operand reduced: N broadcast copies must not be summed
        def forward(self, x, p):
            return x * torch.softmax(p * 2, -1), torch.softmax(x, -1) * (p * 2).sum(-1, keepdim=True)

    class DroppedDimReadAgain(torch.nn.Module):  # e / e.sum(-1) broadcasts the [B] sum along the last axis
        def forward(self, x):
            e = torch.exp(x)
            return e / e.sum(-1)

    class PerRowOutput(torch.nn.Module):
        def forward(self, x):
            return (x * x).mean(-1)

    class IntegerSum(torch.nn.Module):
        def forward(self, m):
            return (m * 3).sum(-1, keepdim=True) + 1

    cases = [(SizeOneRow(), (torch.randn(3, 8), torch.randn(3, 1))), (DroppedDimReadAgain(), (torch.randn(8, 8),)),
             (PerRowOutput(), (torch.randn(2, 3, 8),)), (IntegerSum(), (torch.full((2, 8), 10**6) + torch.arange(8),))]
    for model, args in cases:
        cm = blade.compile(model, args, backend="triton")
        for got, want in zip(_flat(cm(*args)), _flat(model(*args))):
            assert got.shape == want.shape and got.dtype == want.dtype, type(model).__name__
            if want.dtype.is_floating_point:
                assert _rel_err(got, want) <= 1e-5, type(model).__name__
            else:
                assert torch.equal(got, want), type(model).__name__
    per_row = blade.compile(PerRowOutput(), (torch.randn(2, 3, 8),), backend="triton").report.backend_details
    assert per_row["kernels"] == 1 and per_row["fallback_regions"] == {}


@interpreted
def test_bad_inputs_are_refused_before_any_kernel_runs(monkeypatch):
    model, example, dynamic = zoo.get("bert")
    cm = blade.compile(model, example, dynamic_shapes=dynamic, backend="triton")
    monkeypatch.setattr(cm.executable, "module", lambda *a: pytest.fail("a kernel ran on bad inputs"))
    ids, mask = zoo.sample_inputs("bert", batch=2, seq=6)
    with pytest.raises(blade.errors.ShapeError, match="input 'input_ids'.*dtype"):
        cm(ids.float(), mask)
    too_long = zoo.sample_inputs("bert", batch=1, seq=65)
    with pytest.raises(blade.errors.ShapeError, match="seq"):
        cm(*too_long)
    with pytest.raises(blade.errors.ConfigError, match="unknown backend 'trition'"):
        blade.compile(model, example, dynamic_shapes=dynamic, backend="trition")
