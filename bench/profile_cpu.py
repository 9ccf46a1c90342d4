"""Utilization on CPU: `blade profile` of zoo models on the eager and onnxruntime backends.

For BERT-base and GPT-base (prefill, batch 1, seq 128) and one gpt_decode base step (batch 1 and 16,
128 cached positions), each compiled once per backend: the model's time, MFU and MBU, how much of
the end-to-end time the backend's profiler attributes to regions, and the regions that lose most
time against their roof. Peaks are measured in this run (blade.perf.peaks.measure).

    python bench/profile_cpu.py      # a few minutes on 2 cores; writes bench/results/profile_cpu.md and .json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import blade
import blade.backends  # noqa: F401  (ONNX Runtime's matmul competes for the peak)
import blade.models as zoo
from blade.perf.peaks import measure
from blade.runtime.profile import profile
from blade.target import detect

CASES = [("bert", {"batch": 1, "seq": 128}), ("gpt", {"batch": 1, "seq": 128}),
         ("gpt_decode", {"batch": 1, "past": 128}), ("gpt_decode", {"batch": 16, "past": 128})]
BACKENDS = ("eager", "onnxruntime")
RESULTS = Path(__file__).resolve().parent / "results" / "profile_cpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    target = detect()
    peaks = measure(target)
    print(f"peaks: {peaks.describe()}", flush=True)
    rows = []
    for name in dict.fromkeys(name for name, _ in CASES):
        model, example, dynamic = zoo.get(name, "base")
        for backend in BACKENDS:
            cm = blade.compile(model, example, dynamic_shapes=dynamic, backend=backend)  # once per model and backend
            for dims in (d for n, d in CASES if n == name):
                inputs = zoo.sample_inputs(name, "base", seed=1, **dims)
                result = profile(cm, cm.flat_inputs(*inputs), repeat=args.repeat, peaks=peaks)
                rows.append({**result.as_dict(), "worst": [r.name for r in result.worst(3)]})
                m = result.model
                print(f"{name} {dims} {backend}: {m['time_ms']:.2f} ms, MFU {m['mfu']:.1%}, MBU {m['mbu']:.1%}, "
                      f"coverage {m['coverage']:.1%}", flush=True)
            del cm
    total = time.perf_counter() - start
    markdown = render(target, peaks, rows, args, total)
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown)
    args.out.with_suffix(".json").write_text(json.dumps({"peaks": peaks.as_dict(), "rows": rows}, indent=1) + "\n")
    return 0


def render(target, peaks, rows, args, total_s) -> str:
    lines = [
        "# blade profile on CPU: zoo models, eager and onnxruntime backends", "",
        f"- machine: {target.describe()}; torch {torch.__version__}, blade {blade.__version__}",
        f"- peaks measured this run: fp32 matmul {peaks.matmul['fp32'] / 1e9:.0f} GFLOP/s "
        f"({', '.join(f'{k} {v / 1e9:.0f}' for k, v in peaks.detail['fp32'].items())}), memory "
        f"{peaks.bandwidth / 1e9:.0f} GB/s (copy {peaks.detail['bandwidth']['copy'] / 1e9:.0f}, read "
        f"{peaks.detail['bandwidth']['read'] / 1e9:.0f}; ridge {peaks.ridge():.1f} FLOP/B)",
        f"- model time: median of {args.repeat} after warm-up; regions: the backend's profiler, median per "
        f"region; coverage = regions' summed time / model time; whole run {total_s / 60:.1f} min",
        "- FLOPs and bytes from blade's IR at the call's sizes; bytes = the least any execution moves "
        "(weights, inputs, outputs, the KV cache); MFU = FLOPs / time / fp32 peak, MBU = bytes / time / memory "
        "bandwidth (the better of a large copy and a large read)", "",
        "| model | sizes | backend | ms | GFLOP | MB | MFU | MBU | bound | coverage | regions | lose most time against their roof |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        m = r["model"]
        sizes = ", ".join(f"{k} {v}" for k, v in r["dims"].items() if k in ("batch", "seq", "past"))
        lines.append(f"| {r['model_name']} | {sizes} | {r['backend']} | {m['time_ms']:.2f} | {m['flops'] / 1e9:.2f} | "
                     f"{m['bytes'] / 1e6:.0f} | {m['mfu']:.1%} | {m['mbu']:.1%} | {m['bound']} | {m['coverage']:.0%} | "
                     f"{len(r['regions'])} | {', '.join(r['worst'])} |")
    lines += ["", "Reproduce: `python bench/profile_cpu.py`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
