"""The IR: import from torch.export, topological nodes, meta with named dims, verify, printing, JSON."""
from __future__ import annotations

import json

import pytest
import sympy
import torch
from torch.export import Dim

from blade.frontend.capture import capture
from blade.errors import GraphError
from blade.ir.graph import Graph, Node, ScalarMeta, TensorMeta
from blade.ir.serialize import graph_from_json, graph_to_json


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        y = torch.relu(self.proj(x))
        return self.norm(y).softmax(-1), y.max(-1), x.shape[0] * 2


@pytest.fixture(scope="module")
def small():
    dims = {"x": {0: Dim("batch", min=1, max=32), 1: Dim("seq", min=2, max=64)}}
    return capture(Small(), (torch.randn(3, 5, 8),), dynamic_shapes=dims)


def test_nodes_are_topological_with_meta(small):
    graph = small.graph
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        assert "val" in node.meta
        for ref in node.refs():
            assert position[ref] < position[node]
    targets = [n.target for n in graph.call_nodes]
    assert torch.ops.aten.linear.default in targets and torch.ops.aten.layer_norm.default in targets


def test_dims_are_named_symbols_with_ranges(small):
    graph = small.graph
    batch, seq = sympy.Symbol("batch", integer=True, positive=True), sympy.Symbol("seq", integer=True, positive=True)
    (x,) = graph.inputs
    assert x.val == TensorMeta((batch, seq, 8), torch.float32, "cpu")
    assert (graph.dims["batch"].min, graph.dims["batch"].max) == (1, 32)
    assert (graph.dims["seq"].min, graph.dims["seq"].max) == (2, 64)
    linear = next(n for n in graph.call_nodes if n.target == torch.ops.aten.linear.default)
    assert linear.shape == (batch, seq, 8) and linear.dtype == torch.float32
    max_node = next(n for n in graph.call_nodes if n.target == torch.ops.aten.max.dim)
    assert [m.dtype for m in max_node.val] == [torch.float32, torch.int64]
    doubled = graph.outputs[-1]
    assert doubled.val == ScalarMeta(int, 2 * batch)


def test_str_lists_every_node_with_shapes(small):
    text = str(small.graph)
    assert "dims: batch in [1, 32], seq in [2, 64]" in text
    assert "fp32[batch, seq, 8] = aten.linear.default(%x, %p_proj_weight, %p_proj_bias)" in text
    assert len(text.splitlines()) == len(small.graph) + 3


def test_dot_export_has_every_node_and_edge(small):
    dot = small.graph.to_dot()
    assert dot.startswith('digraph "Small"')
    assert dot.count("->") == small.graph.nx.number_of_edges() + len(small.graph.output_nodes)
    for node in small.graph.nodes:
        assert f'"{node.name}" [label=' in dot


def test_fx_round_trip_is_bitwise(small):
    x = torch.randn(4, 9, 8)
    got = small.graph.to_fx()(x)
    want = torch.utils._pytree.tree_leaves(small.exported.module()(x))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w) if isinstance(w, torch.Tensor) else g == w


def test_json_round_trip_is_exact(small):
    data = json.loads(json.dumps(graph_to_json(small.graph)))
    again = graph_from_json(data, small.graph.constants)
    assert str(again) == str(small.graph)
    x = torch.randn(2, 3, 8)
    for g, w in zip(again.to_fx()(x), small.graph.to_fx()(x)):
        assert torch.equal(g, w) if isinstance(w, torch.Tensor) else g == w


def test_json_refuses_unknown_functions(small):
    data = graph_to_json(small.graph)
    data["nodes"][-1]["target"] = "os.system"
    with pytest.raises(Exception, match="os.system"):
        graph_from_json(data, small.graph.constants)


def test_verify_catches_a_cycle(small):
    graph = small.graph.copy()
    linear = next(n for n in graph.call_nodes if n.target == torch.ops.aten.linear.default)
    relu = graph.users(linear)[0]
    graph.set_args(linear, (relu, *linear.args[1:]))
    with pytest.raises(GraphError, match="cycle: .*linear"):
        graph.verify()


def test_verify_catches_a_dangling_reference(small):
    graph = small.graph.copy()
    relu = next(n for n in graph.call_nodes if n.target == torch.ops.aten.relu.default)
    ghost = Node("ghost", "call", torch.ops.aten.relu.default, meta={"val": relu.val})
    graph.set_args(relu, (ghost,))
    with pytest.raises(GraphError, match="dangling reference: relu reads ghost"):
        graph.verify()


def test_verify_catches_edges_out_of_sync(small):
    graph = small.graph.copy()
    relu = next(n for n in graph.call_nodes if n.target == torch.ops.aten.relu.default)
    relu.args = (graph.inputs[0],)  # bypassing Graph.set_args leaves the edges stale
    with pytest.raises(GraphError, match="edges of relu do not match"):
        graph.verify()


def test_remove_node_refuses_while_read(small):
    graph = small.graph.copy()
    linear = next(n for n in graph.call_nodes if n.target == torch.ops.aten.linear.default)
    with pytest.raises(GraphError, match="still read by"):
        graph.remove_node(linear)


def test_copy_is_independent(small):
    graph = small.graph.copy()
    relu = next(n for n in graph.call_nodes if n.target == torch.ops.aten.relu.default)
    graph.replace_all_uses(relu, relu.args[0])
    graph.remove_node(relu)
    assert len(graph) == len(small.graph) - 1
    small.graph.verify()
    graph.verify()


def test_graph_built_by_hand():
    graph = Graph("hand")
    meta = TensorMeta((4,), torch.float32)
    x = graph.add_input("x", meta)
    y = graph.add_node(torch.ops.aten.relu.default, (x,), meta={"val": meta})
    z = graph.add_node(torch.ops.aten.add.Tensor, (y, x), meta={"val": meta})
    graph.outputs = [z]
    graph.verify()
    assert [n.name for n in graph.nodes] == ["x", "relu", "add"]
    assert graph.nx.edges[x, z]["slots"] == ["args[1]"]
    t = torch.randn(4)
    assert torch.equal(graph.to_fx()(t)[0], torch.relu(t) + t)


def test_verify_catches_input_and_constant_bookkeeping(small):
    graph = small.graph.copy()
    graph.inputs.append(graph.inputs[0])
    with pytest.raises(GraphError, match="listed twice"):
        graph.verify()
    graph = small.graph.copy()
    graph.inputs.clear()
    with pytest.raises(GraphError, match="input node x is missing from graph.inputs"):
        graph.verify()
    graph = small.graph.copy()
    graph.constants["stray"] = torch.zeros(1)
    with pytest.raises(GraphError, match=r"constant tensors without a node: \['stray'\]"):
        graph.verify()
    graph = small.graph.copy()
    name = graph.constant_nodes[0].name
    graph.constants[name] = torch.zeros(2)
    with pytest.raises(GraphError, match=f"constant {name} holds"):
        graph.verify()
    with pytest.raises(GraphError, match="cannot remove input x"):
        small.graph.copy().remove_node(graph.inputs[0])


def test_replace_all_uses_can_insert_after(small):
    graph = small.graph.copy()
    linear = next(n for n in graph.call_nodes if n.target == torch.ops.aten.linear.default)
    neg = graph.add_node(torch.ops.aten.neg.default, (linear,), meta={"val": linear.val})
    graph.replace_all_uses(linear, neg)
    graph.verify()
    assert neg.args == (linear,) and graph.users(linear) == [neg]
