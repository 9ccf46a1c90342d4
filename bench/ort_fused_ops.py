"""ONNX Runtime's fused com.microsoft ops vs the plain ONNX subgraphs they replace, on this machine.

blade's fusion pass groups residual + layer norm, RMSNorm and bias + GELU into regions; the ONNX
Runtime backend can hand each to ONNX Runtime as one contrib op or as plain ONNX ops. This times
both forms of each, alone in a session (ORT_ENABLE_BASIC, so ONNX Runtime does not re-fuse the
plain form), intra-op threads = cores, batch 1, hidden 768 (GELU: 3072), at several sequence
lengths, interleaved, median of --repeat runs. The lowering table in
backends/onnxruntime/fused.py follows these numbers.

    python bench/ort_fused_ops.py [--seqs 128 1024] [--repeat 200]

Writes bench/results/ort_fused_ops.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repo_path  # noqa: E402,F401

import blade.target  # noqa: E402

HIDDEN, FFN = 768, 3072
MSFT = "com.microsoft"


def _norm(kind: str, width: int) -> tuple[list, list[str]]:
    """(nodes, extra outputs) for one form of one pattern over inputs x, s and weights g, b, bias."""
    node = helper.make_node
    plain_rms = [node("Mul", ["sum", "sum"], ["sq"]), node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
                 node("Add", ["ms", "eps"], ["mse"]), node("Sqrt", ["mse"], ["rt"]), node("Reciprocal", ["rt"], ["inv"]),
                 node("Mul", ["sum", "inv"], ["nrm"]), node("Mul", ["nrm", "g"], ["y"])]
    forms = {
        "skip_layer_norm+sum/contrib": [node("SkipLayerNormalization", ["x", "s", "g", "b", "bias"], ["y", "", "", "sum"],
                                             domain=MSFT, epsilon=1e-5)],
        "skip_layer_norm+sum/plain": [node("Add", ["x", "bias"], ["xb"]), node("Add", ["xb", "s"], ["sum"]),
                                      node("LayerNormalization", ["sum", "g", "b"], ["y"], axis=-1, epsilon=1e-5)],
        "skip_layer_norm/contrib": [node("SkipLayerNormalization", ["x", "s", "g", "b", "bias"], ["y"], domain=MSFT,
                                         epsilon=1e-5)],
        "skip_layer_norm/plain": [node("Add", ["x", "bias"], ["xb"]), node("Add", ["xb", "s"], ["sum"]),
                                  node("LayerNormalization", ["sum", "g", "b"], ["y"], axis=-1, epsilon=1e-5)],
        "rms_norm/contrib": [node("SimplifiedLayerNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-6)],
        "rms_norm/plain": [node("Identity", ["x"], ["sum"])] + plain_rms,
        "skip_rms_norm+sum/contrib": [node("SkipSimplifiedLayerNormalization", ["x", "s", "g"], ["y", "", "", "sum"],
                                           domain=MSFT, epsilon=1e-6)],
        "skip_rms_norm+sum/plain": [node("Add", ["x", "s"], ["sum"])] + plain_rms,
        "bias_gelu/contrib": [node("BiasGelu", ["x", "bias"], ["y"], domain=MSFT)],
        "bias_gelu/plain": [node("Add", ["x", "bias"], ["xb"]), node("Gelu", ["xb"], ["y"])],
        "bias_gelu_tanh/contrib": [node("FastGelu", ["x", "bias"], ["y"], domain=MSFT)],
        "bias_gelu_tanh/plain": [node("Add", ["x", "bias"], ["xb"]), node("Gelu", ["xb"], ["y"], approximate="tanh")],
    }
    outputs = ["y", "sum"] if "+sum" in kind else ["y"]
    return forms[kind], outputs


def build(kind: str, seq: int) -> bytes:
    width = FFN if "gelu" in kind else HIDDEN
    nodes, outputs = _norm(kind, width)
    rng = np.random.default_rng(0)
    weights = [helper.make_tensor(n, TensorProto.FLOAT, [width], rng.random(width, dtype=np.float32).tolist())
               for n in ("g", "b", "bias")]
    weights += [helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
                helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-6])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, seq, width]) for n in ("x", "s")]
    graph = helper.make_graph(nodes, kind.replace("/", "_").replace("+", "_"), inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(MSFT, 1)],
                              ir_version=10)  # ONNX Runtime 1.30 refuses onnx's newest IR
    return model.SerializeToString()


def session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = os.cpu_count() or 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def time_pair(kind: str, seq: int, repeat: int) -> dict:
    width = FFN if kind.startswith("bias_gelu") else HIDDEN
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((1, seq, width), dtype=np.float32) for n in ("x", "s")}
    runs = {}
    for form in ("contrib", "plain"):
        sess = session(build(f"{kind}/{form}", seq))
        wanted = {i.name for i in sess.get_inputs()}
        runs[form] = (sess, {k: v for k, v in feeds.items() if k in wanted})
    outs = {form: sess.run(None, f) for form, (sess, f) in runs.items()}
    err = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)) for a, b in zip(outs["contrib"], outs["plain"]))
    samples = {form: [] for form in runs}
    for i in range(repeat + 20):
        for form, (sess, f) in runs.items():
            start = time.perf_counter()
            sess.run(None, f)
            if i >= 20:
                samples[form].append(time.perf_counter() - start)
    med = {form: sorted(v)[len(v) // 2] * 1e3 for form, v in samples.items()}
    return {"kind": kind, "seq": seq, "contrib_ms": med["contrib"], "plain_ms": med["plain"],
            "plain_speedup": med["contrib"] / med["plain"], "max_rel_diff": err}


KINDS = ["skip_layer_norm+sum", "skip_layer_norm", "rms_norm", "skip_rms_norm+sum", "bias_gelu", "bias_gelu_tanh"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", nargs="+", type=int, default=[128, 1024])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ort_fused_ops.md")
    args = parser.parse_args(argv)
    rows = [time_pair(kind, seq, args.repeat) for kind in KINDS for seq in args.seqs]
    lines = ["# ONNX Runtime fused contrib ops vs the plain ONNX they replace (CPU)", "",
             f"- machine: {blade.target.detect().describe()}; onnxruntime {ort.__version__}; "
             f"{os.cpu_count()} intra-op threads; ORT_ENABLE_BASIC (no re-fusing); batch 1",
             f"- median of {args.repeat} interleaved runs after 20 warm-up; width {HIDDEN} (GELU {FFN}); "
             "`python bench/ort_fused_ops.py`", "",
             "| pattern | seq | contrib op ms | plain ONNX ms | plain is faster by | max rel diff |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['seq']} | {r['contrib_ms']:.3f} | {r['plain_ms']:.3f} | "
                     f"{r['plain_speedup']:.2f}x | {r['max_rel_diff']:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
