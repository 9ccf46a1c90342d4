"""attention: every spelling of attention becomes exactly one blade::flash_attention that matches
eager on fresh inputs (eager and ONNX Runtime backends); what it cannot replace is left and listed."""
from __future__ import annotations

import math

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import blade
from blade.ops.attention import FLASH_ATTENTION

from helpers import assert_matches, forbid_recompiling, gqa_capture_may_fail

B, H, S, D = 2, 4, 9, 8
FLASH, SOFTMAX = "blade.flash_attention.default", "aten.softmax.int"


def heads(x, n=H):
    """[B, S, n*D] → [B, n, S, D], the usual split."""
    return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


class Attn(torch.nn.Module):
    """Projections around a pluggable scores→probs→out body, so every variant is a full layer."""

    def __init__(self, body, kv_heads=H):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(H * D, n * D) for n in (H, kv_heads, kv_heads))
        self.kv_heads, self.body = kv_heads, body

    def forward(self, x, mask=None):
        q, k, v = heads(self.q(x)), heads(self.k(x), self.kv_heads), heads(self.v(x), self.kv_heads)
        out = self.body(q, k, v) if mask is None else self.body(q, k, v, mask)
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)


def tril(n, device=None):
    return torch.tril(torch.ones(n, n, dtype=torch.bool, device=device))


def plain(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1) @ v


BODIES = {
    "plain": plain,
    "mul_scale": lambda q, k, v: (q @ k.transpose(-2, -1) * D ** -0.5).softmax(-1) @ v,
    "scale_on_q": lambda q, k, v: torch.softmax((q * D ** -0.5) @ k.transpose(-1, -2), dim=3) @ v,
    "scale_on_k": lambda q, k, v: torch.softmax(q @ (k / math.sqrt(D)).transpose(-1, -2), dim=-1) @ v,
    "scale_after_mask": lambda q, k, v: ((q @ k.transpose(-1, -2)).masked_fill(~tril(q.shape[2]), float("-inf"))
                                         * 0.5).softmax(-1) @ v,
    "no_scale": lambda q, k, v: (q @ k.transpose(-1, -2)).softmax(-1) @ v,
    "permute_kt": lambda q, k, v: (q @ k.permute(0, 1, 3, 2) * 0.3).softmax(-1) @ v,
    "causal_tril": lambda q, k, v: (q @ k.transpose(-1, -2) * 0.3).masked_fill(
        ~tril(q.shape[2], q.device), float("-inf")).softmax(-1) @ v,
    "causal_triu": lambda q, k, v: (q @ k.transpose(-1, -2) * 0.3).masked_fill(
        torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1), float("-inf")).softmax(-1) @ v,
    "causal_arange": lambda q, k, v: torch.where(
        torch.arange(q.shape[2])[:, None] >= torch.arange(q.shape[2])[None, :], q @ k.transpose(-1, -2) * 0.3,
        float("-inf")).softmax(-1) @ v,
    "causal_additive": lambda q, k, v: (q @ k.transpose(-1, -2) * 0.3 + torch.full(
        (q.shape[2], q.shape[2]), float("-inf")).triu(1)).softmax(-1) @ v,
    "causal_finfo_min": lambda q, k, v: (q @ k.transpose(-1, -2) * 0.3).masked_fill(
        ~tril(q.shape[2]), torch.finfo(torch.float32).min).softmax(-1) @ v,
    "fp32_upcast": lambda q, k, v: (q @ k.transpose(-1, -2) * 0.3).float().softmax(-1).to(q.dtype) @ v,
    "softmax_dtype": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1, dtype=torch.float32) @ v,
    "eval_dropout": lambda q, k, v: F.dropout((q @ k.transpose(-1, -2) * 0.3).softmax(-1), 0.1, False) @ v,
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    "sdpa_causal_scale": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2),
}


MASKED_BODIES = {
    "additive": lambda q, k, v, m: (q @ k.transpose(-1, -2) * 0.3 + m).softmax(-1) @ v,
    "bool": lambda q, k, v, m: (q @ k.transpose(-1, -2) * 0.3).masked_fill(~m, float("-inf")).softmax(-1) @ v,
    "bool_causal": lambda q, k, v, m: (q @ k.transpose(-1, -2) * 0.3).masked_fill(
        ~(m & tril(q.shape[2])), float("-inf")).softmax(-1) @ v,
}


def padding_masks(kind, seq) -> tuple:
    """() for kind None, else a [B, 1, 1, seq] key-padding mask: "float" additive (0 / -1e4) or "bool".
    Key 0 is always kept: a query with every key masked is NaN in eager code."""
    if kind is None:
        return ()
    keep = torch.rand(B, 1, 1, seq) > 0.3
    keep[..., 0] = True
    return (torch.where(keep, 0.0, -1e4),) if kind == "float" else (keep,)


def compile_body(body, *extra, kv_heads=H, backend="eager", seq=S):
    model = Attn(body, kv_heads).eval()
    x = torch.randn(B, seq, H * D)
    seq_dim = Dim("seq", min=2, max=64)
    dims = ({1: seq_dim},) + tuple({3: seq_dim} for _ in extra)  # masks are [B, 1, 1, seq]
    return model, blade.compile(model, (x, *extra), dynamic_shapes=dims, backend=backend)


def attention_record(cm):
    (record,) = [r for r in cm.report.passes if r["name"] == "attention"]
    return record


def flash_nodes(cm):
    return [n for n in cm.graph.call_nodes if n.target is FLASH_ATTENTION]


def check_fresh(model, cm, *extra, seq=11, tol=1e-5):
    x = torch.randn(B, seq, H * D)
    with torch.no_grad():
        assert_matches(cm(x, *extra), model(x, *extra), tol)


@pytest.mark.parametrize("name", sorted(BODIES))
def test_each_spelling_becomes_one_flash_attention(name):
    model, cm = compile_body(BODIES[name])
    counts = cm.graph.count_targets()
    assert counts.get(FLASH) == 1 and SOFTMAX not in counts and "aten.matmul.default" not in counts, counts
    assert attention_record(cm)["counts"]["attention_replaced"] == 1
    check_fresh(model, cm)


@pytest.mark.parametrize("name, causal, scale", [
    ("plain", False, D ** -0.5), ("scale_on_q", False, D ** -0.5), ("scale_on_k", False, D ** -0.5),
    ("no_scale", False, 1.0), ("causal_tril", True, 0.3), ("causal_triu", True, 0.3), ("causal_arange", True, 0.3),
    ("causal_additive", True, 0.3), ("causal_finfo_min", True, 0.3), ("sdpa", False, D ** -0.5),
    ("sdpa_causal_scale", True, 0.2)])
def test_scale_and_causal_are_read_off_the_pattern(name, causal, scale):
    _, cm = compile_body(BODIES[name])
    (node,) = flash_nodes(cm)
    q, k, v, mask, got_scale, got_causal = node.args
    assert mask is None and got_causal is causal and got_scale == pytest.approx(scale)
    assert q.val.shape[1:] == (H, q.val.shape[2], D)


class ContiguousAttn(Attn):
    """Heads merged back as many models write it: out.transpose(1, 2).contiguous().view(...)."""

    def forward(self, x):
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        return self.body(q, k, v).transpose(1, 2).contiguous().view(x.shape[0], x.shape[1], -1)


def test_the_copy_after_the_transpose_back_is_dropped():
    """The op's output memory is [B, S, H, D]: out.transpose(1, 2) is dense, its copy needless."""
    model = ContiguousAttn(BODIES["causal_tril"]).eval()
    cm = blade.compile(model, (torch.randn(B, S, H * D),), dynamic_shapes=({1: Dim("seq", min=2, max=64)},),
                       backend="eager")
    targets = cm.graph.count_targets()
    assert "aten.clone.default" not in targets and "aten.contiguous.default" not in targets
    assert attention_record(cm)["counts"]["output_copies_absorbed"] == 1
    check_fresh(model, cm)


def test_scale_after_a_mask_scales_the_mask_too():
    """(s + m) * c is c*s + c*m: an additive mask met before the scale is scaled with it."""
    body = lambda q, k, v, m: ((q @ k.transpose(-1, -2) + m) * 0.5).softmax(-1) @ v  # noqa: E731
    mask = torch.randn(B, 1, 1, S)
    model, cm = compile_body(body, mask)
    (node,) = flash_nodes(cm)
    assert node.args[4] == 0.5 and node.args[3] is not None
    check_fresh(model, cm, torch.randn(B, 1, 1, 11))


@pytest.mark.parametrize("kind", ["additive", "masked_fill", "where_keep", "where_drop"])
def test_data_masks_pass_through_as_the_op_mask(kind):
    bodies = {
        "additive": lambda q, k, v, m: (q @ k.transpose(-1, -2) * 0.3 + m).softmax(-1) @ v,
        "masked_fill": lambda q, k, v, m: (q @ k.transpose(-1, -2) * 0.3).masked_fill(~m, float("-inf")).softmax(-1) @ v,
        "where_keep": lambda q, k, v, m: torch.where(m, q @ k.transpose(-1, -2) * 0.3, float("-inf")).softmax(-1) @ v,
        "where_drop": lambda q, k, v, m: torch.where(~m, float("-inf"), q @ k.transpose(-1, -2) * 0.3).softmax(-1) @ v,
    }

    def make_mask(seq):
        keep = torch.rand(B, 1, 1, seq) > 0.3
        keep[..., 0] = True  # every query keeps a key: a fully masked row is NaN in eager
        return torch.where(keep, 0.0, -1e4) if kind == "additive" else keep

    model, cm = compile_body(bodies[kind], make_mask(S))
    (node,) = flash_nodes(cm)
    assert node.args[3] is not None and node.args[3].val.rank == 4 and node.args[5] is False
    check_fresh(model, cm, make_mask(11))


def test_sliding_window_stays_an_explicit_mask():
    def window(q, k, v):
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(q.shape[2])[None, :]
        allowed = (j <= i) & (i - j < 3)
        return (q @ k.transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf")).softmax(-1) @ v

    model, cm = compile_body(window)
    (node,) = flash_nodes(cm)
    assert node.args[3] is not None and node.args[5] is False
    check_fresh(model, cm)


def test_a_window_wider_than_small_sizes_is_not_taken_for_causal():
    """At seq 7 and 12 a 16-wide sliding window is exactly causal; at the dim's max (64) it is not."""
    def window(q, k, v):
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(q.shape[2])[None, :]
        return (q @ k.transpose(-1, -2) * 0.3).masked_fill(~((j <= i) & (i - j < 16)), float("-inf")).softmax(-1) @ v

    model, cm = compile_body(window)
    (node,) = flash_nodes(cm)
    assert node.args[3] is not None and node.args[5] is False
    check_fresh(model, cm, seq=40)


def test_unbounded_seq_keeps_a_size_only_mask_explicit_and_says_why():
    model = Attn(BODIES["causal_tril"]).eval()
    cm = blade.compile(model, (torch.randn(B, S, H * D),), dynamic_shapes=({1: Dim("seq", min=2)},), backend="eager")
    (node,) = flash_nodes(cm)
    assert node.args[3] is not None and node.args[5] is False
    (note,) = attention_record(cm)["notes"]
    assert "may exceed 8192" in note and "max" in note
    check_fresh(model, cm)


@pytest.mark.parametrize("spelling", ["causal_tril", "sdpa_causal_scale"])  # SDPA: what Hugging Face calls
@pytest.mark.parametrize("style", [pytest.param("repeat_interleave", marks=gqa_capture_may_fail()),
                                   pytest.param("hf_repeat_kv", marks=gqa_capture_may_fail()), "mqa_expand"])
def test_grouped_query_attention_reads_kv_heads_without_the_repeat(style, spelling):
    kv_heads = 1 if style == "mqa_expand" else 2

    def repeat(x):
        groups = H // kv_heads
        if style == "repeat_interleave":
            return x.repeat_interleave(groups, dim=1)
        if style == "mqa_expand":
            return x.expand(-1, H, -1, -1)
        b, h, s, d = x.shape
        return x[:, :, None, :, :].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)

    body = lambda q, k, v: BODIES[spelling](q, repeat(k), repeat(v))  # noqa: E731
    model, cm = compile_body(body, kv_heads=kv_heads)
    (node,) = flash_nodes(cm)
    q, k, v = node.args[:3]
    assert k.val.shape[1] == kv_heads and v.val.shape[1] == kv_heads and node.args[5] is True
    counts = cm.graph.count_targets()
    assert not {"aten.repeat_interleave.self_int", "aten.expand.default"} & set(counts), counts
    check_fresh(model, cm)


def test_rank3_bmm_attention():
    class Bmm(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.25, dim=-1), v)

    q, k, v = (torch.randn(6, S, D) for _ in range(3))
    model = Bmm()
    cm = blade.compile(model, (q, k, v), backend="eager")
    assert cm.graph.count_targets().get(FLASH) == 1
    q, k, v = (torch.randn(6, S, D) for _ in range(3))
    assert_matches(cm(q, k, v), model(q, k, v), 1e-5)


def test_bf16_upcast_pattern_matches_within_bf16_tolerance():
    model = Attn(BODIES["fp32_upcast"]).eval().to(torch.bfloat16)
    x = torch.randn(B, S, H * D, dtype=torch.bfloat16)
    cm = blade.compile(model, (x,), backend="eager", check_accuracy=False)
    assert cm.graph.count_targets().get(FLASH) == 1
    x = torch.randn(B, S, H * D, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = Attn(BODIES["fp32_upcast"]).eval()(x.float())
        assert_matches(cm(x).float(), ref, 2e-2)


LEFT_ALONE = {
    "softmax over the query axis": (lambda q, k, v: (q @ k.transpose(-1, -2)).softmax(-2) @ v, "not the last"),
    "weights also returned": (None, "read by more than the values product"),
    "scale by data": (lambda q, k, v: (q @ k.transpose(-1, -2) * q.sum()).softmax(-1) @ v, "not a constant"),
    "finite masked_fill": (lambda q, k, v: (q @ k.transpose(-1, -2)).masked_fill(~tril(q.shape[2]), 0.0)
                           .softmax(-1) @ v, "not -inf"),
    "negative scale": (lambda q, k, v: (q @ k.transpose(-1, -2) * -0.5).softmax(-1) @ v, "positive"),
}


@pytest.mark.parametrize("case", sorted(LEFT_ALONE))
def test_what_is_not_attention_is_left_alone_and_listed(case):
    body, reason = LEFT_ALONE[case]
    if body is None:
        class Weights(torch.nn.Module):
            def forward(self, q, k, v):
                probs = (q @ k.transpose(-1, -2) * 0.3).softmax(-1)
                return probs @ v, probs
        model = Weights()
        inputs = tuple(torch.randn(B, H, S, D) for _ in range(3))
        cm = blade.compile(model, inputs, backend="eager")
        fresh = tuple(torch.randn(B, H, S, D) for _ in range(3))
        assert_matches(cm(*fresh), model(*fresh), 1e-6)
    else:
        model, cm = compile_body(body)
        check_fresh(model, cm)
    record = attention_record(cm)
    assert FLASH not in cm.graph.count_targets() and record["counts"]["softmax_left"] == 1
    assert record["nodes_before"] == record["nodes_after"], "a graph the pass does not match stays as it was"
    assert any(reason in note for note in record["notes"]), record["notes"]


def test_report_lists_what_was_replaced():
    _, cm = compile_body(BODIES["causal_tril"])
    (note,) = attention_record(cm)["notes"]
    assert "flash_attention" in note and "causal" in note
    assert note in str(cm.report)


def test_one_compile_serves_other_sequence_lengths(monkeypatch):
    model, cm = compile_body(BODIES["causal_tril"])
    forbid_recompiling(monkeypatch)
    for seq in (2, 5, 33):
        check_fresh(model, cm, seq=seq)


def test_optimize_1_keeps_the_written_attention():
    model = Attn(plain).eval()
    cm = blade.compile(model, (torch.randn(B, S, H * D),), backend="eager", optimize=1)
    assert FLASH not in cm.graph.count_targets() and SOFTMAX in cm.graph.count_targets()


def test_saved_artifact_with_the_op_loads_and_matches(tmp_path):
    model, cm = compile_body(BODIES["causal_tril"])
    cm.save(tmp_path / "m.blade")
    loaded = blade.load(tmp_path / "m.blade")
    assert FLASH in loaded.graph.count_targets()
    check_fresh(model, loaded)


# -- the Triton kernel, interpreted on CPU (on CUDA it is the op's implementation) ---------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA: test_gpu_model_runs_the_triton_kernel")
@pytest.mark.parametrize("name, kv_heads, extra", [
    ("plain", H, None), ("causal_tril", H, None), ("causal_tril", 1, None), ("sdpa_causal_scale", H, None),
    ("additive", H, "float"), ("bool", H, "bool")])
def test_interpreted_triton_path_runs_the_compiled_graph(name, kv_heads, extra):
    pytest.importorskip("triton")
    from blade.backends.kernels import attention_triton as triton_attention
    from blade.backends.kernels import registry

    body = BODIES.get(name) or MASKED_BODIES[name]
    if kv_heads != H:
        inner = body
        body = lambda q, k, v: inner(q, k.expand(-1, H, -1, -1), v.expand(-1, H, -1, -1))  # noqa: E731
    model, cm = compile_body(body, *padding_masks(extra, S), kv_heads=kv_heads)
    calls = []

    def counted(*args):
        calls.append(1)
        return triton_attention.flash_attention(*args)

    with registry.override("flash_attention", "cpu", counted):
        check_fresh(model, cm, *padding_masks(extra, 11))
    assert calls == [1]


# -- ONNX Runtime lowering ---------------------------------------------------------------------

@pytest.mark.parametrize("name, kv_heads, extra", [
    ("plain", H, None), ("causal_tril", H, None), pytest.param("causal_tril", 2, None, marks=gqa_capture_may_fail()),
    ("sdpa", H, None), ("sdpa_causal_scale", H, None),
    ("additive", H, "float"), ("bool", H, "bool"), ("bool_causal", 1, "bool")])
def test_onnxruntime_runs_its_own_fused_attention(tmp_path, name, kv_heads, extra):
    """Causal without a mask: GroupQueryAttention (GQA heads in place); else MultiHeadAttention."""
    body = BODIES.get(name) or MASKED_BODIES[name]
    if kv_heads != H:
        groups = H // kv_heads
        inner = body
        body = lambda q, k, v, *m: inner(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), *m)  # noqa: E731
    model, cm = compile_body(body, *padding_masks(extra, S), kv_heads=kv_heads, backend="onnxruntime")
    assert cm.report.backend_details["nodes"]["torch"] == 0, cm.report.backend_details
    cm.executable.to_onnx(tmp_path / "m.onnx")
    nodes = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.node
    ops = [n.op_type for n in nodes]
    # with its present K/V outputs GroupQueryAttention's CPU kernel holds no scores (bench/ort_attention_ops.py)
    assert all(len(n.output) == 3 for n in nodes if n.op_type == "GroupQueryAttention")
    fused = "GroupQueryAttention" if "causal" in name and extra is None else "MultiHeadAttention"
    assert ops.count(fused) == 1 and len([o for o in ops if "Attention" in o]) == 1 and "Softmax" not in ops, ops
    check_fresh(model, cm, *padding_masks(extra, 11))


# -- on a GPU: the whole path, with the Triton kernel as the op's CUDA implementation --------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name, kv_heads", [("causal_tril", H), pytest.param("causal_tril", 2, marks=gqa_capture_may_fail()),
                                            ("sdpa", H), ("plain", H)])
def test_gpu_model_runs_the_triton_kernel(name, kv_heads):
    from blade.backends.kernels import attention_triton as triton_attention
    from blade.backends.kernels import registry

    body = BODIES[name]
    if kv_heads != H:
        inner, groups = body, H // kv_heads
        body = lambda q, k, v: inner(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))  # noqa: E731
    model = Attn(body, kv_heads).eval().cuda().half()
    x = torch.randn(B, 64, H * D, device="cuda", dtype=torch.half)
    calls = []

    def counted(*args):
        calls.append(1)
        return triton_attention.flash_attention(*args)

    with registry.override("flash_attention", "cuda", counted):
        cm = blade.compile(model, (x,), dynamic_shapes=({1: Dim("seq", min=2, max=512)},), backend="eager",
                           check_accuracy=False)
        assert cm.graph.count_targets().get(FLASH) == 1
        x = torch.randn(B, 300, H * D, device="cuda", dtype=torch.half)
        out = cm(x)
    assert calls, "the Triton kernel did not run"
    with torch.no_grad():
        ref = Attn(body, kv_heads).eval().cuda()(x.float())
    assert_matches(out.float(), ref, 1e-2)


# -- found in review: layouts, broadcasts, masks that only look causal, finite fills --------------

class QKV(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        return self.fn(q, k, v)


def compile_qkv(fn, shapes, backend="eager", dims=None):
    model = QKV(fn)
    inputs = tuple(torch.randn(*s) for s in shapes)
    cm = blade.compile(model, inputs, backend=backend, dynamic_shapes=dims)
    fresh = tuple(torch.randn(*s) for s in shapes)
    with torch.no_grad():
        assert_matches(cm(*fresh), model(*fresh), 1e-5)
    return cm


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
@pytest.mark.parametrize("after", ["reshape_heads_into_batch", "flatten", "sdpa_then_add"])
def test_views_after_the_op_work_whatever_its_layout(backend, after):
    """The op's output memory is [B, S, H, D]: a view export recorded for a dense [B, H, S, D] result
    (directly or through elementwise ops) must still work."""
    fns = {
        "reshape_heads_into_batch": lambda q, k, v: ((q @ k.transpose(-1, -2) * 0.3).softmax(-1) @ v).reshape(8, 9, 8),
        "flatten": lambda q, k, v: ((q @ k.transpose(-1, -2) * 0.3).softmax(-1) @ v).flatten(2),
        "sdpa_then_add": lambda q, k, v: (F.scaled_dot_product_attention(q, k, v) + 1).view(8, 9, 8),
    }
    cm = compile_qkv(fns[after], [(2, 4, 9, 8)] * 3, backend=backend)
    assert cm.graph.count_targets().get(FLASH) == 1


@pytest.mark.parametrize("k_shape, v_shape", [((1, 4, 9, 8), (1, 4, 9, 8)), ((2, 1, 9, 8), (2, 4, 9, 8)),
                                              ((2, 4, 9, 8), (2, 1, 9, 8))])
def test_kv_broadcast_the_op_cannot_take_is_left_alone(k_shape, v_shape):
    cm = compile_qkv(lambda q, k, v: (q @ k.transpose(-1, -2) * 0.3).softmax(-1) @ v, [(2, 4, 9, 8), k_shape, v_shape])
    assert FLASH not in cm.graph.count_targets()
    assert attention_record(cm)["counts"]["softmax_left"] == 1


def test_one_kv_head_broadcast_by_the_matmul_is_multi_query():
    cm = compile_qkv(lambda q, k, v: (q @ k.transpose(-1, -2) * 0.3).softmax(-1) @ v, [(2, 4, 9, 8), (2, 1, 9, 8),
                                                                                       (2, 1, 9, 8)])
    assert cm.graph.count_targets().get(FLASH) == 1


def test_a_mask_mixing_two_dims_is_not_taken_for_causal():
    """j <= i + (pad - seq) is causal only when pad == seq; every sample must not set them equal."""
    class Padded(torch.nn.Module):
        def forward(self, q, k, v, pad):
            s = q.shape[2]
            i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
            allowed = j <= i + (pad.shape[0] - s)
            return (q @ k.transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf")).softmax(-1) @ v

    seq, pad = Dim("seq", min=2, max=64), Dim("pad", min=2, max=64)
    model = Padded()
    inputs = tuple(torch.randn(2, 4, 9, 8) for _ in range(3)) + (torch.zeros(12),)
    cm = blade.compile(model, inputs, backend="eager",
                       dynamic_shapes=({2: seq}, {2: seq}, {2: seq}, {0: pad}))
    for node in flash_nodes(cm):
        assert node.args[5] is False and node.args[3] is not None
    fresh = tuple(torch.randn(2, 4, 9, 8) for _ in range(3)) + (torch.zeros(12),)
    with torch.no_grad():
        assert_matches(cm(*fresh), model(*fresh), 1e-5)


@pytest.mark.parametrize("spelling", ["masked_fill", "where"])
def test_a_finite_fill_on_a_padding_mask_is_left_alone(spelling):
    """finfo.min fills: a row with every key masked averages v in eager; the op would give zeros."""
    fill = torch.finfo(torch.float32).min

    def body(q, k, v, keep):
        scores = q @ k.transpose(-1, -2) * 0.3
        scores = scores.masked_fill(~keep, fill) if spelling == "masked_fill" else torch.where(keep, scores, fill)
        return scores.softmax(-1) @ v

    keep = torch.rand(B, 1, 1, S) > 0.3
    keep[0] = False  # batch 0: every key masked
    model, cm = compile_body(body, keep)
    assert FLASH not in cm.graph.count_targets()
    assert any("finite value" in note for note in attention_record(cm)["notes"])
    fresh = torch.rand(B, 1, 1, 11) > 0.3
    fresh[0] = False
    check_fresh(model, cm, fresh)


@pytest.mark.parametrize("shapes, mask, words", [
    (((2, 4, 9, 8), (2, 4, 9), (2, 4, 9, 8)), None, r"k must be 4-D"),
    (((2, 4, 9, 8), (3, 4, 9, 8), (3, 4, 9, 8)), None, r"batch sizes differ"),
    (((2, 4, 9, 8), (2, 3, 9, 8), (2, 3, 9, 8)), None, r"query heads 4 are not a multiple of key/value heads 3"),
    (((2, 4, 9, 8), (2, 4, 9, 6), (2, 4, 9, 8)), None, r"q head_dim 8 != k head_dim 6"),
    (((2, 4, 9, 8), (2, 4, 9, 8), (2, 4, 9, 8)), (5, 9), r"mask of shape \(5, 9\) does not broadcast"),
])
def test_the_op_names_the_argument_it_cannot_take(shapes, mask, words):
    from blade.errors import ShapeError

    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ShapeError, match=words):
        FLASH_ATTENTION(q, k, v, None if mask is None else torch.zeros(*mask), None, False)
