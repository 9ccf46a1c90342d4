"""passes/rewrite.py: a plan leaves the graph alone until committed; new nodes get their meta from the op."""
from __future__ import annotations

import torch

from blade.ir.graph import Graph, TensorMeta
from blade.passes.rewrite import New, Plan, Region

aten = torch.ops.aten


def small_graph() -> Graph:
    graph = Graph()
    x = graph.add_input("x", TensorMeta((2, 3), torch.float32))
    y = graph.add_node(aten.relu.default, (x,), meta={"val": TensorMeta((2, 3), torch.float32)}, name="y")
    graph.outputs = [y]
    return graph


def test_a_plan_touches_nothing_until_committed():
    graph = small_graph()
    before = str(graph)
    y = graph.node("y")
    t = New(aten.transpose.int, (y, 0, 1), name="t")
    doubled = New(aten.mul.Tensor, (t, 2.0), name="doubled")
    plan = Plan("y", reroute=[(y, doubled)])
    assert str(graph) == before, "planning adds nothing"
    made = plan.commit(graph)
    assert graph.outputs == [made[doubled]] and made[doubled].args == (made[t], 2.0)
    graph.verify()


def test_new_nodes_take_their_meta_from_the_op():
    graph = small_graph()
    t = New(aten.transpose.int, (graph.node("y"), 0, 1))
    wide = New(aten.cat.default, ([t, t], 1))
    assert t.val.shape == (3, 2) and wide.val.shape == (3, 4) and wide.val.dtype == torch.float32


def test_a_region_may_hold_nodes_the_plan_adds():
    graph = small_graph()
    y = graph.node("y")
    plus = New(aten.add.Tensor, (y, 1.0), name="plus")
    Plan("y", reroute=[(y, plus)], region=Region([y, plus], "loop", "loop")).commit(graph)
    (fused,) = [n for n in graph.call_nodes]
    assert fused.target.pattern == "loop" and [n.target for n in fused.target.body.call_nodes] == \
        [aten.relu.default, aten.add.Tensor]
    graph.verify()
