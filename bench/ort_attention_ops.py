"""ONNX Runtime's fused attention ops on CPU: which forms hold the [heads, seq, seq] scores.

One gpt-base-sized attention layer (12 heads, head dim 64, batch 1, seq 2048, fp32), one node per
model, each run in a fresh child process: peak resident memory the first run adds (VmHWM - VmRSS
before it, after resetting the mark through /proc/self/clear_refs) and its time, checked against
torch's scaled_dot_product_attention. This is what chose blade's lowering in
backends/onnxruntime/translations.py. One layer's scores would be 192 MiB. MFU = attention FLOPs
(blade.perf.cost.attention_flops: QKᵀ and PV, the causal half for causal forms) / median time / the fp32
matmul peak, MBU = bytes (q, k, v and the bias read, the output written) / median time / memory
bandwidth (the better of a large copy and a large read), both peaks measured in the same run (blade.perf.peaks.measure).

    python bench/ort_attention_ops.py      # writes bench/results/ort_attention_ops.md
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

S, N, H = 2048, 12, 64
CASES = {
    "MultiHeadAttention, K/V [B,S,H*D]": dict(op="mha", kv="bsh"),
    "MultiHeadAttention, K/V [B,H,S,D]": dict(op="mha", kv="bnsh"),
    "MultiHeadAttention, K/V [B,S,H*D], unidirectional": dict(op="mha", kv="bsh", causal=True),
    "MultiHeadAttention, K/V [B,S,H*D], attention_bias": dict(op="mha", kv="bsh", bias=True),
    "GroupQueryAttention (causal)": dict(op="gqa", kv="bsh", causal=True),
    "GroupQueryAttention (causal), present K/V outputs": dict(op="gqa", kv="bsh", causal=True, present=True),
}
RESULTS = Path(__file__).resolve().parent / "results" / "ort_attention_ops.md"


def child(case: dict) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto as T
    from onnx import helper

    bsh = case["kv"] == "bsh"
    kv_shape = [1, S, N * H] if bsh else [1, N, S, H]
    inputs = [helper.make_tensor_value_info("q", T.FLOAT, [1, S, N * H])]
    inputs += [helper.make_tensor_value_info(n, T.FLOAT, kv_shape) for n in "kv"]
    present = ["present_key", "present_value"] if case.get("present") else []
    if case["op"] == "gqa":
        inputs += [helper.make_tensor_value_info("seqlens_k", T.INT32, [1]),
                   helper.make_tensor_value_info("total", T.INT32, [])]
        node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total"], ["o", *present],
                                domain="com.microsoft", num_heads=N, kv_num_heads=N)
    else:
        names = ["q", "k", "v", "", "", "b" if case.get("bias") else ""]
        if case.get("bias"):
            inputs.append(helper.make_tensor_value_info("b", T.FLOAT, [1, 1, S, S]))
        node = helper.make_node("MultiHeadAttention", names, ["o"], domain="com.microsoft", num_heads=N,
                                unidirectional=int(case.get("causal", False)))
    graph = helper.make_graph([node], "attention", inputs, [helper.make_tensor_value_info("o", T.FLOAT, [1, S, N * H])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)  # ONNX Runtime 1.30 refuses onnx's newest IR
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, S, N * H), dtype=np.float32) for _ in range(3))
    feeds = {"q": q, "k": k, "v": v}
    if not bsh:
        feeds.update({n: x.reshape(1, S, N, H).transpose(0, 2, 1, 3).copy() for n, x in (("k", k), ("v", v))})
    if case["op"] == "gqa":
        feeds.update(seqlens_k=np.array([S - 1], np.int32), total=np.array(S, np.int32))
    if case.get("bias"):
        feeds["b"] = np.zeros((1, 1, S, S), np.float32)
    from attention_memory import proc_status_bytes

    before = proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    out = session.run(["o"], feeds)[0]
    first_s = time.perf_counter() - start
    peak = proc_status_bytes("VmHWM") - before
    times = []
    for _ in range(5):
        start = time.perf_counter()
        session.run(["o"], feeds)
        times.append(time.perf_counter() - start)
    heads = [torch.from_numpy(x).view(1, S, N, H).transpose(1, 2) for x in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*heads, is_causal=case.get("causal", False))
    ref = ref.transpose(1, 2).reshape(1, S, N * H)
    err = float((torch.from_numpy(out) - ref).norm() / ref.norm())
    return {"peak_mib": peak / 2 ** 20, "first_ms": first_s * 1e3, "median_ms": sorted(times)[2] * 1e3, "rel_err": err}


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(CASES[sys.argv[2]])))
        return 0
    import onnxruntime
    import platform

    import blade.backends  # noqa: F401  (ONNX Runtime's matmul competes for the peak)
    from blade.perf.cost import attention_flops
    from blade.perf.peaks import measure
    from blade.target import detect

    peaks = measure(detect())
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    rows = []
    for name in CASES:
        out = subprocess.run([sys.executable, __file__, "--child", name], check=True, env=env,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append((name, json.loads(out)))
    lines = [f"# ONNX Runtime attention ops on CPU: seq {S}, {N} heads, head dim {H}, fp32, batch 1", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; onnxruntime "
             f"{onnxruntime.__version__}. Peak = resident memory the first run adds; one layer's scores are "
             f"{N * S * S * 4 / 2 ** 20:.0f} MiB. Time: median of 5 runs after the first. Peaks measured in this "
             f"run: fp32 matmul {peaks.matmul['fp32'] / 1e9:.0f} GFLOP/s, memory {peaks.bandwidth / 1e9:.0f} GB/s.", "",
             "| form | peak MiB | median ms | MFU | MBU | rel err vs SDPA |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        case = CASES[name]
        flops = attention_flops(1, N, S, S, H, H, case.get("causal", False))
        moved = 4 * (4 * S * N * H + (S * S if case.get("bias") else 0))
        seconds = r["median_ms"] / 1e3
        lines.append(f"| {name} | {r['peak_mib']:.0f} | {r['median_ms']:.0f} | "
                     f"{flops / seconds / peaks.matmul['fp32']:.0%} | {moved / seconds / peaks.bandwidth:.1%} | "
                     f"{r['rel_err']:.1e} |")
    lines += ["", "Reproduce: `python bench/ort_attention_ops.py`", ""]
    text = "\n".join(lines)
    print(text)
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
