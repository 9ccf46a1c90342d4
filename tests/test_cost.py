"""The cost model: FLOPs equal hand formulas, symbolic totals equal concrete ones, unknown ops listed."""
from __future__ import annotations

import pytest
import sympy
import torch
from torch.export import Dim

import blade
import blade.models as zoo
from blade.frontend.capture import capture
from blade.perf.cost import graph_cost, node_cost, node_kind, region_cost
from blade.ir.graph import Graph, ScalarMeta, TensorMeta
from blade.ops.attention import FLASH_ATTENTION
from helpers import Apply

b = sympy.Symbol("batch", integer=True, positive=True)
BATCH = Dim("batch", min=1, max=64)


def cost_of(module, *inputs, dynamic=True):
    dims = tuple({0: BATCH} for _ in inputs) if dynamic else None
    return graph_cost(capture(module.eval(), inputs, dynamic_shapes=dims).graph)


def test_linear_with_and_without_bias():
    x = torch.randn(2, 5, 16)
    assert cost_of(torch.nn.Linear(16, 32), x).flops == sympy.expand(2 * b * 5 * 32 * 16 + b * 5 * 32)
    assert cost_of(torch.nn.Linear(16, 32, bias=False), x).flops == 2 * b * 5 * 32 * 16


def test_matmul_and_bmm():
    a, c = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 8, 6)
    assert cost_of(Apply(torch.matmul), a, c).flops == 2 * b * 3 * 4 * 6 * 8
    a, c = torch.randn(2, 4, 8), torch.randn(2, 8, 6)
    assert cost_of(Apply(torch.bmm), a, c).flops == 2 * b * 4 * 6 * 8


def test_conv2d():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    cost = cost_of(conv, torch.randn(2, 3, 10, 10))
    assert cost.flops == sympy.expand(2 * b * 8 * 10 * 10 * 3 * 3 * 3 + b * 8 * 10 * 10)
    # bytes: input, weight, bias read once; output written once (fp32)
    assert cost.bytes == sympy.expand(4 * (b * 3 * 100 + 8 * 3 * 9 + 8 + b * 8 * 100))


def test_a_depthwise_conv2d_with_same_padding_is_a_convolution():
    """padding="same" captures as aten.conv2d.padding (HF EfficientNet): counted, and lowered by precision."""
    conv = torch.nn.Conv2d(8, 8, 3, padding="same", groups=8, bias=False)
    graph = capture(conv.eval(), (torch.randn(2, 8, 10, 10),), dynamic_shapes=({0: BATCH},)).graph
    (node,) = [n for n in graph.call_nodes if n.target is torch.ops.aten.conv2d.padding]
    assert node_kind(node) == "conv"
    assert graph_cost(graph).flops == 2 * b * 8 * 10 * 10 * 1 * 3 * 3


@pytest.mark.parametrize("causal", [False, True])
def test_attention_counts_what_it_computes(causal):
    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    q = torch.randn(2, 4, 10, 8)
    seq = Dim("seq", min=2, max=64)
    cm = blade.compile(Apply(attend), (q, q.clone(), q.clone()), backend="eager",
                       dynamic_shapes=tuple({0: BATCH, 2: seq} for _ in range(3)))
    (node,) = [n for n in cm.graph.call_nodes if n.target is FLASH_ATTENTION]
    s = sympy.Symbol("seq", integer=True, positive=True)
    scores = s * (s + 1) / 2 if causal else s * s
    assert node_cost(node).flops == sympy.expand(2 * b * 4 * scores * (8 + 8))


def test_views_cost_nothing_and_copies_move_bytes():
    def reshape_then_copy(x):
        return x.transpose(1, 2).contiguous()

    cost = cost_of(Apply(reshape_then_copy), torch.randn(2, 3, 5))
    assert cost.flops == 0 and cost.bytes == 2 * 4 * b * 15


def test_an_unknown_op_is_listed_not_guessed():
    cost = cost_of(Apply(lambda x: torch.fft.fft(x).real), torch.randn(2, 8))
    assert cost.unknown and any("fft" in name for name in cost.unknown), cost.unknown


@pytest.mark.parametrize("sizes", [(2, 7), (3, 12)])
def test_symbolic_totals_of_gpt_match_a_static_capture(sizes):
    model, example, dims = zoo.get("gpt")
    dynamic = blade.compile(model, example, dynamic_shapes=dims, backend="eager", check_accuracy=False)
    batch, seq = sizes
    ids = torch.randint(0, 100, (batch, seq))
    static = blade.compile(model, (ids,), backend="eager", check_accuracy=False)
    assert isinstance(graph_cost(static.graph).flops, int)
    want = graph_cost(static.graph)
    assert graph_cost(dynamic.graph).at({"batch": batch, "seq": seq}) == (want.flops, want.bytes)


def test_bert_base_flops_are_the_weights_times_tokens_plus_attention():
    model, example, dims = zoo.get("bert", "base")
    graph: Graph = capture(model, example, dynamic_shapes=dims).graph
    batch, seq = 1, 128
    flops, _ = graph_cost(graph).at({"batch": batch, "seq": seq})
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    layers = sum(1 for m in model.modules() if type(m).__name__ == "SelfAttention")
    hidden = linears[0].in_features
    expected = 2 * sum(m.weight.numel() for m in linears) * batch * seq + 2 * 2 * layers * batch * seq * seq * hidden
    assert abs(flops - expected) / expected < 0.01, (flops, expected)


def test_region_cost_counts_only_what_crosses_the_boundary():
    def fused_then_scaled(x, w1, w2):
        return torch.nn.functional.gelu(x @ w1).reshape(64) * w2

    cm = blade.compile(Apply(fused_then_scaled), (torch.randn(4, 8), torch.randn(8, 16), torch.randn(64)),
                       backend="eager", optimize=0)
    graph = cm.graph
    (matmul,) = [n for n in graph.call_nodes if node_kind(n) == "matmul"]
    (gelu,) = [n for n in graph.call_nodes if n.target is torch.ops.aten.gelu.default]
    fused = region_cost(graph, [matmul, gelu])
    assert fused.flops == 2 * 4 * 16 * 8 + 4 * 16
    assert fused.bytes == 4 * (4 * 8 + 8 * 16 + 4 * 16)  # x and w1 in, gelu out (read through a view): no intermediate
    assert region_cost(graph, [gelu]).bytes == 4 * (4 * 16 + 4 * 16)
    views = [n for n in graph.call_nodes if node_kind(n) == "view"]
    assert views and region_cost(graph, views) == region_cost(graph, []) and region_cost(graph, views).bytes == 0
    whole = region_cost(graph, graph.call_nodes)
    assert whole.bytes == 4 * (4 * 8 + 8 * 16 + 64 + 64)  # inputs and the output: the least any execution moves


def whole_bytes(fn, *inputs):
    cm = blade.compile(Apply(fn), inputs, backend="eager", optimize=0, check_accuracy=False)
    return region_cost(cm.graph, cm.graph.call_nodes).bytes, cm.graph


def test_a_tensor_is_read_once_and_an_expand_no_more_than_its_source():
    x, y = torch.randn(64, 256), torch.randn(1, 256)
    moved, _ = whole_bytes(lambda a, b: a * b.expand(64, 256), x, y)
    assert moved == 4 * (64 * 256 + 256 + 64 * 256)
    moved, _ = whole_bytes(lambda a: a @ a.t(), torch.randn(64, 64))
    assert moved == 4 * (64 * 64 + 64 * 64)  # x read once through both of its views


def test_a_size_query_is_not_a_write():
    aten = torch.ops.aten
    graph = Graph("sizes")
    x, y = (graph.add_input(name, TensorMeta((b, 8), torch.float32)) for name in "xy")
    hidden = graph.add_node(aten.relu.default, (x,), meta={"val": TensorMeta((b, 8), torch.float32)})
    rows = graph.add_node(aten.sym_size.int, (hidden, 0), meta={"val": ScalarMeta(int, b)})
    shaped = graph.add_node(aten.view.default, (y, [rows, 8]), meta={"val": TensorMeta((b, 8), torch.float32)})
    out = graph.add_node(aten.mul.Tensor, (shaped, 2), meta={"val": TensorMeta((b, 8), torch.float32)})
    graph.outputs = [out]
    assert region_cost(graph, [hidden]).bytes == 4 * b * 8  # reads x; its output is only measured, never read
    assert region_cost(graph, [out]).bytes == 2 * 4 * b * 8


def test_an_embedding_reads_only_the_rows_it_gathers():
    table, ids = torch.nn.Embedding(1000, 16), torch.randint(0, 1000, (2, 5))
    (node,) = [n for n in capture(table, (ids,)).graph.call_nodes if node_kind(n) == "move"]
    assert node_cost(node).bytes == 8 * 10 + 4 * 10 * 16 + 4 * 10 * 16  # ids, the 10 rows, the output
