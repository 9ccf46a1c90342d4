"""quantize and precision passes: what they rewrite, what they leave, and the numbers against fp32."""
from __future__ import annotations

import pytest
import torch

import blade
from blade.passes import cleanup, precision, quantize
from blade.ops.quantized import QEMBEDDING, QLINEAR, qlinear_reference, quantize_weight

aten = torch.ops.aten


class Tower(torch.nn.Module):
    """Two linears, a layer norm, a softmax, a tied embedding/output head and a computed-weight matmul."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(40, 16)
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 40, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids, w):
        x = self.embed(ids)
        x = self.norm(x + self.down(torch.relu(self.up(x))))
        mixed = torch.softmax(x @ w, dim=-1)  # a weight computed per call: never quantized
        return self.head(x) + mixed.sum(-1, keepdim=True)


def example(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (2, 6), generator=gen), torch.randn(16, 16, generator=gen)


def compiled(passes, **options):
    return blade.compile(Tower().eval(), example(), backend="eager", passes=passes, **options)


def relative(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def cosine(out, ref):
    out, ref = out.detach(), ref.detach()
    out, ref = out.double().flatten(), ref.double().flatten()
    return float(out @ ref / (out.norm() * ref.norm()))


@pytest.mark.parametrize("mode,weight_dtype", [("int8_weight_only", torch.int8), ("int8_dynamic", torch.int8),
                                               ("fp8", torch.float8_e4m3fn)])
def test_linears_become_qlinear_with_per_channel_weights(mode, weight_dtype):
    cm = compiled([cleanup.run, quantize.run], quantize=mode)
    qlinears = [n for n in cm.graph.call_nodes if n.target == QLINEAR]
    assert len(qlinears) == 3 and not [n for n in cm.graph.call_nodes if n.target == aten.linear.default]
    assert all(n.args[1].dtype == weight_dtype and n.args[2].val.shape == (n.args[1].val.shape[0],) for n in qlinears)
    assert [n for n in cm.graph.call_nodes if n.target == aten.matmul.default]  # computed weight left alone
    record = next(p for p in cm.report.passes if p["name"] == "quantize")
    assert record["counts"][f"qlinear_{quantize.OP_MODE[mode]}"] == 3 and record["counts"]["qembedding"] == 1
    ids, w = example(5)
    ref = Tower().eval()(ids, w)
    assert cosine(cm(ids, w), ref) >= 0.999


def test_tied_table_and_head_share_one_int8_copy():
    cm = compiled([cleanup.run, quantize.run], quantize="int8_dynamic")
    embedding = next(n for n in cm.graph.call_nodes if n.target == QEMBEDDING)
    head = [n for n in cm.graph.call_nodes if n.target == QLINEAR and n.args[1].val.shape == (40, 16)]
    assert head and head[0].args[1] is embedding.args[0] and head[0].args[2] is embedding.args[1]
    assert not any(t.dtype == torch.float32 and t.shape == (40, 16) for t in cm.graph.constants.values())
    code = cm.executable.module.code  # the eager backend calls the reference itself, not through the dispatcher
    assert "qembedding_reference" in code and "torch.ops.blade.qembedding" not in code
    ids, w = example(5)
    assert relative(cm(ids, w), Tower().eval()(ids, w)) < 0.05


def test_kept_layers_and_no_mode_leave_the_graph_alone():
    plain = compiled([cleanup.run, quantize.run])
    assert plain.graph.count_targets() == compiled([cleanup.run]).graph.count_targets()
    config = blade.CompileConfig(quantize="int8_dynamic", keep_high_precision=frozenset({"linear"}))
    from blade.passes import run_pipeline

    graph, _ = run_pipeline(plain.graph, [quantize.run], config)
    assert graph.node("linear").target == aten.linear.default
    assert sum(n.target == QLINEAR for n in graph.call_nodes) == 2


def test_embedding_bag_pools_dequantized_rows():
    from blade import models

    model, ex, dims = models.get("dlrm")
    cm = blade.compile(model, ex, dynamic_shapes=dims, backend="eager", quantize="int8_weight_only")
    bags = [n for n in cm.graph.call_nodes if n.target == aten.embedding_bag.padding_idx]
    assert len(bags) == 3 and all(b.args[0].target == QEMBEDDING for b in bags)
    tables = [t for t in cm.graph.constants.values() if t.dtype == torch.int8 and t.shape == (50, 8)]
    assert len(tables) == 3
    fresh = models.sample_inputs("dlrm", seed=7, batch=5)
    assert cosine(cm(*fresh), model(*fresh)) >= 0.999


def test_static_scales_come_from_calibration():
    calibration = [example(s) for s in range(1, 4)]
    cm = compiled([cleanup.run, quantize.run], quantize="int8_static", calibration_data=calibration)
    up = next(n for n in cm.graph.call_nodes if n.target == QLINEAR and n.args[1].val.shape == (32, 16))
    model = Tower().eval()
    seen = max(float(model.embed(ids).abs().max()) for ids, _ in calibration)  # the example is not calibration
    assert up.kwargs["input_scale"] == pytest.approx(seen / 127, rel=1e-6)


def test_qlinear_reference_semantics():
    torch.manual_seed(1)
    x, weight, bias = torch.randn(3, 5, 24), torch.randn(10, 24), torch.randn(10)
    exact = x @ weight.t() + bias
    q, scale = quantize_weight(weight, "dynamic")
    assert (q.float() * scale[:, None] - weight).abs().max() <= scale.max() / 2 + 1e-6
    for mode, bound in (("weight_only", 1e-2), ("dynamic", 2e-2), ("fp8", 8e-2)):
        qw, s = quantize_weight(weight, mode)
        assert relative(qlinear_reference(x, qw, s, bias, mode), exact) < bound
    zeros = qlinear_reference(torch.zeros(2, 24), q, scale, bias, "dynamic")
    assert torch.equal(zeros, bias.expand(2, 10))
    with pytest.raises(blade.errors.ShapeError, match="weight must be a 2-D torch.int8"):
        qlinear_reference(x, weight, scale, bias, "dynamic")


@pytest.mark.parametrize("precision_name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_precision_lowers_matmuls_only(precision_name, dtype):
    cm = compiled([cleanup.run, precision.run], precision=precision_name)
    low = [n for n in cm.graph.call_nodes if n.meta.get("precision") == precision_name]
    assert {n.target for n in low} == {aten.linear.default, aten.matmul.default}
    assert all(n.val.dtype == dtype for n in low)
    norm = next(n for n in cm.graph.call_nodes if n.target == aten.layer_norm.default)
    soft = next(n for n in cm.graph.call_nodes if n.target == aten._softmax.default or n.target == aten.softmax.int)
    assert norm.val.dtype == torch.float32 and soft.val.dtype == torch.float32
    # the tied weight (table and head) is cast once, and weights are cast at compile time, not per call
    low_weights = [t for t in cm.graph.constants.values() if t.dtype == dtype]
    assert sum(t.shape == (40, 16) for t in low_weights) == 1
    casts_of_constants = [n for n in cm.graph.call_nodes if precision.is_cast(n) and n.args[0].op == "constant"]
    assert not casts_of_constants
    ids, w = example(4)
    out, ref = cm(ids, w), Tower().eval()(ids, w)
    assert out.dtype == torch.float32 and relative(out, ref) <= 1e-2


def test_precision_passes_low_values_between_matmuls_directly():
    class Chain(torch.nn.Module):
        def forward(self, a, b, c):
            return (a @ b) @ c

    args = tuple(torch.randn(4, 4) for _ in range(3))
    cm = blade.compile(Chain(), args, backend="eager", passes=[precision.run], precision="fp16")
    second = [n for n in cm.graph.call_nodes if n.meta.get("precision")][1]
    assert second.args[0].meta.get("precision") == "fp16"  # no fp32 round trip between the two


def test_precision_passes_low_values_through_views_and_splits():
    """A fused QKV projection feeds attention, and attention the output projection, through splits, reshapes and
    transposes: no fp32 round trip between them (bf16 -> fp32 -> bf16 is exact, so the values are the same)."""
    from blade.ops.attention import FLASH_ATTENTION
    from blade.passes import attention as attention_pass, horizontal

    from blade.models import get

    model, example, dynamic = get("bert", "tiny")
    cm = blade.compile(model, example, dynamic_shapes=dynamic, backend="eager", precision="bf16", cache=False,
                       passes=[cleanup.run, attention_pass.run, horizontal.run, precision.run])

    def source(node):  # walk back through shape-only ops and splits
        while node.op == "call" and node.target not in (aten.linear.default, FLASH_ATTENTION) \
                and not precision.is_cast(node):
            node = node.args[0]
        return node

    attentions = [n for n in cm.graph.call_nodes if n.target == FLASH_ATTENTION]
    assert attentions
    for node in attentions:
        for operand in node.args[:3]:
            assert operand.val.dtype == torch.bfloat16 and source(operand).target == aten.linear.default
    out_projections = [n for n in cm.graph.call_nodes if n.target == aten.linear.default and
                       source(n.args[0]).target == FLASH_ATTENTION]
    assert len(out_projections) == len(attentions)
    assert cm.report.accuracy.ok


def test_bad_options_name_what_to_do():
    with pytest.raises(blade.errors.ConfigError, match="precision='fp64' is not one of"):
        compiled(None, precision="fp64")
    with pytest.raises(blade.errors.ConfigError, match="quantize='int4' is not a mode"):
        compiled(None, quantize="int4")
    with pytest.raises(blade.errors.ConfigError, match="int8_static' needs calibration_data"):
        compiled(None, quantize="int8_static")
    with pytest.raises(blade.errors.ConfigError, match="accuracy_budget applies to quantize"):
        compiled(None, accuracy_budget=0.1)
    with pytest.raises(blade.errors.ConfigError, match="positive relative error"):
        compiled(None, quantize="int8_dynamic", accuracy_budget=-1)
    with pytest.raises(blade.errors.ConfigError, match="not one sample"):
        compiled(None, quantize="int8_static", calibration_data=torch.zeros(3))
    with pytest.raises(blade.errors.InputError, match=r"calibration_data\[1\] does not fit"):
        compiled(None, quantize="int8_static", calibration_data=[example(1), (torch.zeros(2, 6, 3), torch.zeros(16, 16))])


class Heads(torch.nn.Module):
    """Outputs of each kind: a linear through views, a norm (no matmul), an integer argmax, a linear read twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        y = self.proj(x)
        heads = y.reshape(x.shape[0], x.shape[1], 4, 8).transpose(1, 2)
        return heads, self.norm(x), y.argmax(-1), torch.relu(y)


@pytest.mark.parametrize("dtype_name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_outputs_read_the_low_values_without_a_cast_back(dtype_name, dtype):
    model, x = Heads().eval(), torch.randn(2, 6, 16)
    kept = blade.compile(model, (x,), backend="eager", precision=dtype_name, cache=False)
    cm = blade.compile(model, (x,), backend="eager", precision=dtype_name, keep_output_dtype=False, cache=False)
    bare = blade.compile(model, (x,), backend="eager", passes=[cleanup.run, precision.run], precision=dtype_name,
                         keep_output_dtype=False, cache=False)  # before fusion folds the casts into regions
    heads, normed, picks, relu = bare.graph.outputs
    # the linear's cast back is gone from the path to the first output: its views are rebuilt on the low value
    assert heads.val.dtype == dtype and heads.target == aten.transpose.int
    assert heads.args[0].args[0].meta.get("precision") == dtype_name
    assert precision.is_cast(normed) and normed.args[0].target == aten.layer_norm.default  # no low op: one cast
    assert picks.val.dtype == torch.int64
    assert cm.report.accuracy.ok, cm.report.accuracy
    fresh = torch.randn(2, 6, 16)
    got, want, ref = cm(fresh), kept(fresh), model(fresh)
    assert [t.dtype for t in got] == [dtype, dtype, torch.int64, dtype]
    assert torch.equal(got[0].float(), want[0])  # the matmul's low result, not re-rounded
    assert torch.equal(got[2], want[2])
    for g, r in zip(got, ref):
        if r.is_floating_point():
            assert float((g.float() - r).norm() / r.norm()) <= 1e-2


def test_low_precision_outputs_need_a_low_precision_and_are_part_of_the_cache_key(tmp_path, monkeypatch):
    model, x = Heads().eval(), torch.randn(2, 6, 16)
    with pytest.raises(blade.errors.ConfigError, match="keep_output_dtype=False .* precision='fp16' or 'bf16'"):
        blade.compile(model, (x,), backend="eager", keep_output_dtype=False, cache=False)
    monkeypatch.setenv("BLADE_CACHE_DIR", str(tmp_path))
    kept = blade.compile(model, (x,), backend="eager", precision="bf16", cache=True)
    low = blade.compile(model, (x,), backend="eager", precision="bf16", keep_output_dtype=False, cache=True)
    assert not low.report.cache["hit"] and low(x)[0].dtype == torch.bfloat16 and kept(x)[0].dtype == torch.float32
    low.save(tmp_path / "low.blade")
    assert blade.load(tmp_path / "low.blade")(x)[1].dtype == torch.bfloat16


def test_a_low_precision_output_never_returns_the_callers_own_tensor():
    class PassThrough(torch.nn.Module):
        def forward(self, x, w):
            return x.float().t(), (x.float() @ w).relu()

    x, w = torch.randn(4, 8).to(torch.bfloat16), torch.randn(8, 8)
    cm = blade.compile(PassThrough(), (x, w), backend="eager", precision="bf16", keep_output_dtype=False, cache=False)
    passed, computed = cm(x, w)
    assert passed.dtype == computed.dtype == torch.bfloat16 and torch.equal(passed, x.t())
    assert passed.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_low_precision_outputs_on_a_cpu_without_bf16_stay_fp32(monkeypatch):
    import blade.api
    from blade.target import Target

    monkeypatch.setattr(blade.driver.pipeline, "detect", lambda device: Target("cpu", "old cpu", "x86_64", ("avx2",), 2))
    monkeypatch.setattr(blade.driver.pipeline, "_WARNED", set())
    with pytest.warns(UserWarning, match="compiling in fp32"):  # no ConfigError: nothing is lowered to return
        cm = blade.compile(Heads().eval(), (torch.randn(2, 6, 16),), backend="eager", precision="bf16",
                           keep_output_dtype=False, cache=False)
    assert all(o.val.dtype in (torch.float32, torch.int64) for o in cm.graph.outputs)
