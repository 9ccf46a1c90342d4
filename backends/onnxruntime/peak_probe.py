"""ONNX Runtime's own matmuls (MLAS on CPU) as peak probes: fp32 MatMul, and int8 through
com.microsoft DynamicQuantizeMatMul with a constant int8 weight (the path blade's int8_dynamic
takes; MatMulInteger on two run-time int8 inputs is far below torch's _int_mm)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from blade.perf.peaks import register_matmul_probe
from blade.target import detect

DTYPES = ("fp32", "int8")


def _model(dtype: str, n: int, rng) -> helper.ModelProto:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    if dtype == "fp32":
        nodes, inputs, weights = [helper.make_node("MatMul", ["a", "b"], ["c"])], [a, helper.make_tensor_value_info(
            "b", TensorProto.FLOAT, [n, n])], []
    else:
        b = rng.integers(-127, 128, (n, n), dtype=np.int8)
        nodes = [helper.make_node("DynamicQuantizeMatMul", ["a", "b", "scale"], ["c"], domain="com.microsoft")]
        inputs = [a]
        weights = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "scale")]
    graph = helper.make_graph(nodes, "matmul", inputs, [c], weights)
    # IR version 10, not onnx's newest: ONNX Runtime 1.30 (the GPU machine's) refuses IR 14 models
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def probe(device: str, dtype: str, n: int):
    """One n x n x n matmul in a CPU session with blade's session options; None where ORT has none."""
    if device != "cpu" or dtype not in DTYPES:
        return None
    from blade.backends.onnxruntime.session import session_options

    rng = np.random.default_rng(0)
    session = ort.InferenceSession(_model(dtype, n, rng).SerializeToString(),
                                   session_options(detect("cpu"), shares_cores=False), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {x: (rng.standard_normal((n, n)) * 32).astype(np.float32) for x in names}
    return lambda: session.run(None, feeds)


def install() -> None:
    register_matmul_probe("onnxruntime", ort.__version__, probe)
