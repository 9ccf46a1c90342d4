"""Which ONNX Runtime form of an int8 / fp8 linear layer is fastest on this CPU, and how accurate each is.

One BERT-base sized layer, x [1, 128, 768] @ W [768, 3072], each form alone in a session (ORT_ENABLE_ALL,
intra-op threads = cores), timed interleaved with a 50 ms idle gap before each run (ONNX Runtime's
worker threads spin after a run) (median of 30 after one warm-up); relative error against
the fp32 product. blade's ONNX lowering of blade::qlinear (backends/onnxruntime/quantized.py) takes
the fastest form of each mode:

- fp32                  MatMul (the baseline)
- dqmm_per_tensor       com.microsoft DynamicQuantizeMatMul on x as it is (per-tensor uint8 activations)
- dqmm_per_token        x scaled per row to max |x| = 127 first, the product scaled back (blade's int8_dynamic)
- matmulinteger_token   per-token int8 x by hand + MatMulInteger (int8 x int8) + Cast + Mul
- nbits8_b{32,128}_acc{0,4}  com.microsoft MatMulNBits with 8-bit blocks; accuracy_level 4 quantizes x too
- static_qdq            QuantizeLinear/DequantizeLinear on x and DequantizeLinear on W + MatMul (ORT fuses it)
- static_mmitf          QuantizeLinear + com.microsoft MatMulIntegerToFloat (int8 x)
- weight_only_dq        DequantizeLinear(W) + MatMul (ORT turns this into MatMulNBits, which quantizes x too)
- weight_only_cast      Cast(W) * scale + MatMul (folded to fp32 when the session loads)
- fp8_cast              x / scale cast to float8e4m3fn and back + MatMul (fp8 emulated; CPUs have no fp8 matmul)

    python bench/ort_quant_ops.py       # writes bench/results/ort_quant_ops.md
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

M, K, N = 128, 768, 3072
RESULTS = Path(__file__).resolve().parent / "results"


def session(nodes, initializers):
    graph = h.make_graph(nodes, "layer", [h.make_tensor_value_info("x", T.FLOAT, [1, M, K])],
                         [h.make_tensor_value_info("y", T.FLOAT, None)], initializers)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 20), h.make_opsetid("com.microsoft", 1)],
                         ir_version=10)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def forms(x, w):
    c = nh.from_array
    sw = (np.abs(w).max(0) / 127).astype(np.float32)
    wq = np.round(w / sw).astype(np.int8)
    zp = np.zeros(N, np.int8)
    xs = np.array(np.abs(x).max() / 127, np.float32)
    axis, c127 = c(np.array([-1], np.int64), "axis"), c(np.array(127, np.float32), "c127")
    row_scale = [h.make_node("Abs", ["x"], ["a"]), h.make_node("ReduceMax", ["a", "axis"], ["m"], keepdims=1),
                 h.make_node("Div", ["m", "c127"], ["s"]), h.make_node("Div", ["x", "s"], ["xn"])]
    yield "fp32", [h.make_node("MatMul", ["x", "w"], ["y"])], [c(w, "w")], 1.0
    yield "dqmm_per_tensor", [h.make_node("DynamicQuantizeMatMul", ["x", "wq", "sw"], ["y"], domain="com.microsoft")], \
        [c(wq, "wq"), c(sw, "sw")], 1.0
    yield "dqmm_per_token", row_scale + [
        h.make_node("DynamicQuantizeMatMul", ["xn", "wq", "sw"], ["yn"], domain="com.microsoft"),
        h.make_node("Mul", ["yn", "s"], ["y"])], [c(wq, "wq"), c(sw, "sw"), axis, c127], 1.0
    yield "matmulinteger_token", row_scale + [
        h.make_node("Round", ["xn"], ["xr"]), h.make_node("Cast", ["xr"], ["xq"], to=T.INT8),
        h.make_node("MatMulInteger", ["xq", "wq"], ["acc"]), h.make_node("Cast", ["acc"], ["af"], to=T.FLOAT),
        h.make_node("Mul", ["s", "sw"], ["ss"]), h.make_node("Mul", ["af", "ss"], ["y"])], \
        [c(wq, "wq"), c(sw, "sw"), axis, c127], 1.0
    for block in (32, 128):
        blocks = w.T.reshape(N, K // block, block)
        scale = np.abs(blocks).max(-1) / 127
        q = (np.clip(np.round(blocks / scale[..., None]), -128, 127).astype(np.int16) + 128).astype(np.uint8)
        for level in (0, 4):
            yield f"nbits8_b{block}_acc{level}", [h.make_node(
                "MatMulNBits", ["x", "qw", "qs"], ["y"], domain="com.microsoft", K=K, N=N, bits=8, block_size=block,
                accuracy_level=level)], [c(q, "qw"), c(scale.astype(np.float32).reshape(-1), "qs")], 1.0
    static = [c(wq, "wq"), c(sw, "sw"), c(zp, "zp"), c(xs, "xs"), c(np.array(0, np.int8), "xzp")]
    yield "static_qdq", [h.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]),
                         h.make_node("DequantizeLinear", ["xq", "xs", "xzp"], ["xd"]),
                         h.make_node("DequantizeLinear", ["wq", "sw", "zp"], ["wd"], axis=1),
                         h.make_node("MatMul", ["xd", "wd"], ["y"])], static, 1.0
    yield "static_mmitf", [h.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]),
                           h.make_node("MatMulIntegerToFloat", ["xq", "wq", "xs", "sw", "xzp", "zp"], ["y"],
                                       domain="com.microsoft")], static, 1.0
    yield "weight_only_dq", [h.make_node("DequantizeLinear", ["wq", "sw", "zp"], ["wd"], axis=1),
                             h.make_node("MatMul", ["x", "wd"], ["y"])], [c(wq, "wq"), c(sw, "sw"), c(zp, "zp")], 1.0
    yield "weight_only_cast", [h.make_node("Cast", ["wq"], ["wf"], to=T.FLOAT), h.make_node("Mul", ["wf", "sw"], ["wd"]),
                               h.make_node("MatMul", ["x", "wd"], ["y"])], [c(wq, "wq"), c(sw, "sw")], 1.0
    s8 = float(np.abs(x).max() / 448)
    yield "fp8_cast", [h.make_node("Div", ["x", "s8"], ["xn"]), h.make_node("Cast", ["xn"], ["x8"], to=T.FLOAT8E4M3FN),
                       h.make_node("Cast", ["x8"], ["xf"], to=T.FLOAT), h.make_node("MatMul", ["xf", "w"], ["y"])], \
        [c(w, "w"), c(np.array(s8, np.float32), "s8")], s8


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, M, K)).astype(np.float32)
    w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    exact = x @ w
    runs, scales, failed = {}, {}, {}
    for name, nodes, initializers, scale in forms(x, w):
        try:
            runs[name], scales[name] = session(nodes, initializers), scale
        except Exception as exc:  # noqa: BLE001 - a form this build lacks is reported
            failed[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
    feeds = {"x": x}
    times = {name: [] for name in runs}
    for s in runs.values():
        s.run(None, feeds)
    for _ in range(30):
        for name, s in runs.items():
            time.sleep(0.05)  # untimed gap: the last session's spinning worker threads would take a core
            start = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    lines = ["# ONNX Runtime forms of an int8 / fp8 linear layer (CPU)", "",
             f"x [1, {M}, {K}] @ W [{K}, {N}]; onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores; median of 30 interleaved runs. `python bench/ort_quant_ops.py`", "",
             "| form | median ms | vs fp32 | rel err vs fp32 |", "|---|---:|---:|---:|"]
    base = float(np.median(times["fp32"]))
    for name, s in runs.items():
        y = s.run(None, feeds)[0] * scales[name]
        median = float(np.median(times[name]))
        lines.append(f"| {name} | {1e3 * median:.3f} | {base / median:.2f}x | "
                     f"{np.linalg.norm(y - exact) / np.linalg.norm(exact):.2e} |")
    lines += [f"- {name}: {why}" for name, why in failed.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ort_quant_ops.md").write_text(text)


if __name__ == "__main__":
    main()
