"""Every zoo model (tiny) compiles, matches eager on fresh inputs at other sizes, and round-trips fx."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.utils._pytree as pytree

import blade
import blade.models as zoo
from blade.frontend.capture import capture
from blade.ir.fused import is_fused

from helpers import assert_matches, forbid_recompiling, fresh_dims, gqa_capture_may_fail


@pytest.fixture(scope="module", params=zoo.names())
def compiled(request):
    model, example_inputs, dynamic_shapes = zoo.get(request.param)
    return request.param, model, blade.compile(model, example_inputs, dynamic_shapes=dynamic_shapes, backend="eager")


def test_matches_eager_on_fresh_inputs_without_recompiling(compiled, monkeypatch):
    name, model, cm = compiled
    forbid_recompiling(monkeypatch)
    for seed in (1, 2):
        inputs = zoo.sample_inputs(name, seed=seed, **fresh_dims(name))
        with torch.no_grad():
            reference = model(*inputs)
        assert_matches(cm(*inputs), reference, tol=1e-6)
    assert cm.report.accuracy.ok and cm.report.accuracy.rel_err <= 1e-6


ATTENTION_MODELS = {"bert", "gpt", "gpt_decode", "vit", "dit"}


def test_attention_is_replaced_and_no_softmax_is_left(compiled):
    name, _, cm = compiled
    counts = cm.graph.count_targets()
    assert "aten.softmax.int" not in counts, counts
    assert (counts.get("blade.flash_attention.default", 0) > 0) == (name in ATTENTION_MODELS), counts


def test_layers_are_fused(compiled):
    """Every zoo model has regions; transformer blocks their residual norms and MLP epilogues."""
    name, _, cm = compiled
    kinds = Counter(n.target.kind for n in cm.graph.call_nodes if is_fused(n))
    assert kinds, name
    if name in ATTENTION_MODELS:
        assert kinds["reduction"] >= 2 and kinds["matmul_epilogue"] >= 1, kinds
    for node in cm.graph.call_nodes:  # a fused op never holds another, nor nothing
        if is_fused(node):
            assert node.target.body.call_nodes and not any(is_fused(m) for m in node.target.body.call_nodes)


def test_dims_are_the_users_names(compiled):
    name, _, cm = compiled
    wanted = set(fresh_dims(name))
    assert {d.split(" ")[0] for d in cm.report.dims} == wanted


@pytest.mark.parametrize("name", zoo.names())
def test_fx_round_trip_is_exact(name):
    model, example_inputs, dynamic_shapes = zoo.get(name)
    captured = capture(model, example_inputs, dynamic_shapes=dynamic_shapes)
    captured.graph.verify()
    inputs = zoo.sample_inputs(name, seed=3, **fresh_dims(name))
    got = captured.graph.to_fx()(*inputs)
    want = pytree.tree_leaves(captured.exported.module()(*inputs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@gqa_capture_may_fail()
def test_grouped_query_llama_variant():
    model, example_inputs, dynamic_shapes = zoo.gpt.tiny_llama()
    cm = blade.compile(model, example_inputs, dynamic_shapes=dynamic_shapes, backend="eager")
    (op, _) = [n for n in cm.graph.call_nodes if n.target is torch.ops.blade.flash_attention.default]
    assert op.args[1].val.shape[1] == 2 and op.args[0].val.shape[1] == 4, "reads the 2 KV heads unrepeated"
    assert "aten.repeat_interleave.self_int" not in cm.graph.count_targets()
    patterns = Counter(n.target.pattern for n in cm.graph.call_nodes if is_fused(n))
    assert patterns["skip_rms_norm"] + patterns["rms_norm"] == 5, patterns  # 2 per layer + final, by hand
    assert "linears_2_into_1" in [r for r in cm.report.passes if r["name"] == "horizontal"][0]["counts"]  # gate/up
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert_matches(cm(ids), model(ids))
    ort = blade.compile(model, example_inputs, dynamic_shapes=dynamic_shapes, backend="onnxruntime")
    assert ort.executable.describe()["nodes"]["torch"] == 0
    with torch.no_grad():
        assert_matches(ort(ids), model(ids), tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.names())
def test_base_size_compiles_and_matches(name):
    model, example_inputs, dynamic_shapes = zoo.get(name, "base")
    cm = blade.compile(model, example_inputs, dynamic_shapes=dynamic_shapes, backend="eager")
    assert cm.report.accuracy.ok, str(cm.report)
    inputs = zoo.sample_inputs(name, "base", seed=5, **fresh_dims(name))
    with torch.no_grad():
        assert_matches(cm(*inputs), model(*inputs), tol=1e-6)
