"""ONNX Runtime's own fp32 MatMul (MLAS on CPU) as a peak probe (its int8 MatMulInteger is far below torch's)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from blade.peaks import register_matmul_probe
from blade.target import detect

_GRAPHS = {"fp32": ("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, np.float32)}


def probe(device: str, dtype: str, n: int):
    """One n x n x n matmul in a CPU session with blade's session options; None where ORT has none."""
    if device != "cpu" or dtype not in _GRAPHS:
        return None
    from blade.backends.onnxruntime.session import session_options

    op_type, in_type, out_type, np_type = _GRAPHS[dtype]
    inputs = [helper.make_tensor_value_info(x, in_type, [n, n]) for x in "ab"]
    output = helper.make_tensor_value_info("c", out_type, [n, n])
    graph = helper.make_graph([helper.make_node(op_type, ["a", "b"], ["c"])], "matmul", inputs, [output])
    # IR version 10, not onnx's newest: ONNX Runtime 1.30 (the GPU machine's) refuses IR 14 models
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), session_options(detect("cpu"), shares_cores=False),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {x: (rng.standard_normal((n, n)) * 32).astype(np_type) for x in "ab"}
    return lambda: session.run(None, feeds)


def install() -> None:
    register_matmul_probe("onnxruntime", ort.__version__, probe)
