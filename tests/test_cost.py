"""The cost model: FLOPs equal hand formulas, symbolic totals equal concrete ones, unknown ops listed."""
from __future__ import annotations

import pytest
import sympy
import torch
from torch.export import Dim

import blade
import blade.models as zoo
from blade.capture import capture
from blade.cost import graph_cost, node_cost
from blade.ir import Graph
from blade.ops import FLASH_ATTENTION
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
