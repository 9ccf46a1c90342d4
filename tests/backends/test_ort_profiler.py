"""Joining ONNX Runtime's optimized, fused nodes back to the IR nodes they compute (hand-made graphs)."""
from __future__ import annotations

import onnx
import torch
from onnx import helper

from blade.backends.onnxruntime.export import IR_NODE_KEY
from blade.backends.onnxruntime.profiler import join_to_ir, kernel_times
from blade.ir.graph import Graph, ScalarMeta, TensorMeta

aten = torch.ops.aten


def node(op_type, inputs, outputs, name, ir=None):
    made = helper.make_node(op_type, inputs, outputs, name=name)
    if ir:
        made.metadata_props.add(key=IR_NODE_KEY, value=ir)
    return made


def model(nodes) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 4])], []))


def ir_graph() -> Graph:
    """x -> linear -> add(residual x) -> layer_norm, and a size query of x."""
    graph = Graph("g")
    meta = TensorMeta((2, 4), torch.float32)
    x = graph.add_input("x", meta)
    rows = graph.add_node(aten.sym_size.int, (x, 0), meta={"val": ScalarMeta(int, 2)}, name="rows")
    linear = graph.add_node(aten.linear.default, (x, x), meta={"val": meta}, name="linear")
    added = graph.add_node(aten.add.Tensor, (linear, x), meta={"val": meta}, name="add")
    norm = graph.add_node(aten.layer_norm.default, (added, [4]), meta={"val": meta}, name="layer_norm")
    graph.outputs = [norm, rows]
    return graph


ORIGINAL = model([
    node("Shape", ["x"], ["shape"], "node_Shape_1"),
    node("MatMul", ["x", "w"], ["mm"], "node_MatMul_2", "linear"),
    node("Add", ["mm", "b"], ["linear"], "node_linear", "linear"),
    node("Add", ["linear", "x"], ["add"], "node_add", "add"),
    node("LayerNormalization", ["add", "g", "beta"], ["layer_norm"], "node_layer_norm", "layer_norm"),
])
OPTIMIZED = model([  # ONNX Runtime fused the bias, the residual and the norm into SkipLayerNormalization
    node("Shape", ["x"], ["shape"], "node_Shape_1"),
    node("MatMul", ["x", "w"], ["mm"], "node_MatMul_2"),
    node("SkipLayerNormalization", ["x", "mm", "g", "beta", "b"], ["layer_norm"], "SkipLayerNormalization"),
])


def test_a_fused_node_joins_the_matmul_that_shares_its_ir_node():
    timed = {"node_Shape_1", "node_MatMul_2", "SkipLayerNormalization"}
    groups = dict((tuple(members), nodes) for members, nodes in join_to_ir(ORIGINAL, OPTIMIZED, ir_graph(), timed))
    assert groups == {("node_Shape_1",): (), ("node_MatMul_2", "SkipLayerNormalization"): ("linear", "add", "layer_norm")}


def test_unfused_nodes_stay_apart():
    timed = {"node_Shape_1", "node_MatMul_2", "node_linear", "node_add", "node_layer_norm"}
    groups = {tuple(m): n for m, n in join_to_ir(ORIGINAL, ORIGINAL, ir_graph(), timed)}
    assert groups[("node_MatMul_2", "node_linear")] == ("linear",)  # one IR node, two ONNX nodes: one region
    assert groups[("node_add",)] == ("add",) and groups[("node_layer_norm",)] == ("layer_norm",)


def test_kernel_times_drop_the_warm_up_runs():
    trace = [{"cat": "Node", "name": "n_kernel_time", "dur": d, "args": {"op_name": "MatMul"}} for d in (900, 10, 12, 11)]
    trace.append({"cat": "Session", "name": "model_run", "dur": 5000})
    assert kernel_times(trace, warmup=1) == {"n": ("MatMul", 11e-6)}
