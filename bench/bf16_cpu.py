"""bf16 on CPU: blade precision="bf16" under measured backend="auto" vs every fp32 and bf16 peer, in one run.

Zoo bert base at seq 128 and zoo gpt base at seq 256 and 1024, batch 1 (the selection issue's cases).
Contenders, timed interleaved with idle gaps (bench/ort_cpu.py's time_contenders), median after warm-up:

- eager, inductor (torch.compile with freezing), ort (plain ONNX Runtime), ort_opt (ONNX Runtime's
  transformers optimizer): fp32, set up exactly as in bench/ort_cpu.py;
- eager_bf16, inductor_bf16: model.to(torch.bfloat16), eager and under torch.compile with freezing;
- blade_bf16: blade.compile(model, <batch-2 inputs of the case's length>, dynamic_shapes=..., precision="bf16",
  autotune=True): matmuls and attention in bf16, norms/softmax/residual in fp32, the backend measured
  among the candidates that can run bf16 on this CPU (eager, inductor); the report's candidate times
  are printed with the table;
- blade_bf16_out: the same with keep_output_dtype=False: outputs in bf16, as the bf16 peers return them
  (blade_bf16 returns the model's fp32 logits, which costs a cast and twice the output bytes).

Errors are relative to eager fp32 on the same inputs. Utilization: FLOPs from blade's IR ÷ median ÷ the
peak of the contender's matmul dtype (fp32 or bf16), both measured in the same run. The verdicts:
blade_bf16 ≥ 1.5x the fastest fp32 peer, and not slower than the fastest bf16 peer; the same for
blade_bf16_out, whose outputs have the peers' dtype. Beside each verdict, the paired ratio: in every round the
fastest bf16 peer's time over blade's (both timed in that round), median and p10–p90, which drift between
rounds does not move. A fast case gets more rounds than --repeat, up to 4x, as many as fit --budget-s of timing.

    python bench/bf16_cpu.py     # writes bench/results/bf16_cpu.{md,json}
    MALLOC_MMAP_THRESHOLD_=536870912 MALLOC_TRIM_THRESHOLD_=1073741824 \
        python bench/bf16_cpu.py --cases gpt:256 gpt:1024 --save-as bf16_cpu_malloc_threshold
                                 # fp32 outputs from the heap: bench/results/bf16_cpu_malloc_threshold.md
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import _repo_path  # noqa: F401  (blade from this checkout when it is not installed)
import torch

import blade
import blade.models as zoo
import blade.target
from blade.perf.peaks import measure
from ort_cpu import (Contender, eager_contender, first_tensor, inductor_contender, ir_work, machine_info,
                     make_inputs, ort_contender, ort_optimizer_contender, rel_err, time_contenders)

CASES = [("bert", 128), ("gpt", 256), ("gpt", 1024)]
FP32 = ("eager", "inductor", "ort", "ort_opt")
BF16 = ("eager_bf16", "inductor_bf16")
RESULTS = Path(__file__).resolve().parent / "results"


BLADE = ("blade_bf16", "blade_bf16_out")


def blade_bf16(name, seq, model, inputs, dims, **options) -> tuple[Contender, object]:
    """Compiled on batch-2 inputs of the case's length (a batch-1 example would make torch.export fix the
    batch), so that the backend is measured near the case's size; timed on the case's batch-1 inputs."""
    example = zoo.sample_inputs(name, "base", seed=5, batch=2, seq=seq)
    if name == "bert":
        example = (example[0], torch.ones_like(example[1]))
    start = time.perf_counter()
    try:
        cm = blade.compile(model, example, dynamic_shapes=dims, precision="bf16", autotune=True, cache=False,
                           **options)
    except Exception as exc:  # noqa: BLE001
        return Contender(None, f"failed: {type(exc).__name__}: {exc}"[:300], time.perf_counter() - start), None
    return Contender(lambda: cm(*inputs), "ok", time.perf_counter() - start,
                     {"backend": cm.backend, "candidates": cm.report.backend_candidates}), cm


def run_case(name: str, seq: int, args, peaks, workdir: Path) -> dict:
    model, _, dims = zoo.get(name, "base")
    inputs = make_inputs(name, seq)
    with torch.inference_mode():
        ref = first_tensor(model(*inputs)).float().clone()
    print(f"-- {name} seq {seq}", flush=True)
    contenders = {"eager": eager_contender(model, inputs), "inductor": inductor_contender(model, inputs, args.warmup),
                  "ort": ort_contender(model, inputs, inputs, workdir, f"{name}_{seq}")}
    contenders["ort_opt"] = ort_optimizer_contender(name, model, contenders["ort"], inputs)
    low = copy.deepcopy(model).to(torch.bfloat16)
    contenders["eager_bf16"] = eager_contender(low, inputs)
    contenders["inductor_bf16"] = inductor_contender(low, inputs, args.warmup)
    # the peers above turned Inductor's freezing on for the whole process; blade must not lean on that (it turns
    # freezing on around its own calls), so it is compiled and timed with the user's default, off
    import torch._inductor.config as inductor_config

    inductor_config.freezing = False
    contenders["blade_bf16"], cm = blade_bf16(name, seq, model, inputs, dims)
    contenders["blade_bf16_out"], _ = blade_bf16(name, seq, model, inputs, dims, keep_output_dtype=False)
    errors = {}
    for key, c in contenders.items():
        if c.fn is not None:
            errors[key] = rel_err(c.fn(), ref)
        print(f"   {key:14s} setup {c.setup_s:6.1f} s  {errors.get(key, c.status)}", flush=True)
    live = {key: c.fn for key, c in contenders.items() if c.fn is not None}
    round_s = sum(_seconds(fn) for fn in live.values()) + len(live) * args.gap_ms / 1e3  # warm calls (the first compiled)
    # a fast case gets more rounds (up to 4x), as many as fit the time budget: its ratios are the closest
    rounds = max(args.repeat, min(4 * args.repeat, int(args.budget_s / max(round_s, 1e-3))))
    medians, spread = time_contenders(live, args.warmup, rounds, args.gap_ms / 1e3)
    work = ir_work(cm, inputs) if cm is not None else {"total": float("nan")}
    rows = {}
    for key, seconds in medians.items():
        dtype = "bf16" if key in BF16 or key in BLADE else "fp32"
        peak, peak_dtype = peaks.flops_peak(dtype)
        rows[key] = {"ms": seconds * 1e3, "rel_err": errors[key], "mfu": work["total"] / seconds / peak,
                     "peak_dtype": peak_dtype, "p10_ms": spread[key]["p10"], "p90_ms": spread[key]["p90"],
                     "minor_faults": spread[key]["minor_faults"]}
    best_fp32 = min((k for k in rows if k in FP32), key=lambda k: rows[k]["ms"], default=None)
    best_bf16 = min((k for k in rows if k in BF16), key=lambda k: rows[k]["ms"], default=None)
    verdict = {}
    for key in BLADE:
        if key in rows and best_fp32 and best_bf16:
            blade_ms = rows[key]["ms"]
            verdict[key] = {"best_fp32": best_fp32, "vs_best_fp32": rows[best_fp32]["ms"] / blade_ms,
                            "best_bf16": best_bf16, "vs_best_bf16": rows[best_bf16]["ms"] / blade_ms,
                            "paired_vs_best_bf16": paired_ratios(spread[best_bf16]["samples_ms"], spread[key]["samples_ms"])}
            verdict[key]["holds"] = verdict[key]["vs_best_fp32"] >= 1.5 and verdict[key]["vs_best_bf16"] >= 1.0
    print("   " + "  ".join(f"{k} {v['ms']:.1f} ms" for k, v in rows.items()), flush=True)
    result = {"model": name, "seq": seq, "rounds": rounds, "rows": rows, "verdict": verdict, "flops": work["total"],
              "status": {k: c.status for k, c in contenders.items()},
              "blade": {key: contenders[key].extra for key in BLADE}}
    del contenders, low, model, cm
    gc.collect()
    torch._dynamo.reset()
    return result


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_ratios(peer: list[float], blade_times: list[float]) -> dict:
    """The peer's time over blade's in each round (both timed in the same round, so drift between rounds cancels):
    median, p10, p90."""
    ratios = sorted(p / b for p, b in zip(peer, blade_times))
    return {"median": ratios[len(ratios) // 2], "p10": ratios[len(ratios) // 10], "p90": ratios[-1 - len(ratios) // 10]}


def render(machine, peaks, cases, args, seconds) -> str:
    lines = ["# bf16 on CPU: blade precision=\"bf16\", backend measured, vs fp32 and bf16 peers", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, flags "
             f"{', '.join(k for k, v in machine['flags'].items() if v)}; torch {machine['torch']}, onnxruntime "
             f"{machine['onnxruntime']}. Peaks this run: " + ", ".join(f"{d} {r / 1e9:.0f} GFLOP/s"
                                                                      for d, r in peaks.matmul.items()) + ".", "",
             f"Batch 1; warm-up {args.warmup}, at least {args.repeat} interleaved rounds with idle gaps (more for a fast "
             f"case, up to {args.budget_s:.0f} s of timing), median; errors vs "
             f"eager fp32. `python bench/bf16_cpu.py` ({seconds:.0f} s). Page faults: the median minor faults per "
             "call — a fresh output buffer over glibc's mmap threshold (GPT's logits: 51 MB in fp32 at seq 256, "
             "25 MB in bf16) is faulted in page by page on every call.", ""]
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if malloc:
        lines += ["glibc malloc settings of this run: " + ", ".join(f"`{k}={v}`" for k, v in sorted(malloc.items()))
                  + " (buffers up to the threshold come from the heap and are reused, not mapped fresh per call).", ""]
    for case in cases:
        lines += [f"## {case['model']} base, seq {case['seq']} ({case['rounds']} rounds)", "",
                  "| contender | median ms | p10–p90 | page faults/call | rel err vs fp32 | MFU |", "|---|---|---|---|---|---|"]
        for key, r in case["rows"].items():
            lines.append(f"| {key} | {r['ms']:.1f} | {r['p10_ms']:.1f}–{r['p90_ms']:.1f} | {r['minor_faults']} | {r['rel_err']:.2e} | "
                         f"{100 * r['mfu']:.0f} % of {r['peak_dtype']} |")
        for key, v in case["verdict"].items():
            paired = v["paired_vs_best_bf16"]
            lines += ["", f"{key}: **{v['vs_best_fp32']:.2f}x** the fastest fp32 peer ({v['best_fp32']}; bound "
                          f"≥ 1.5x), **{v['vs_best_bf16']:.2f}x** the fastest bf16 peer ({v['best_bf16']}; bound ≥ 1.0x): "
                          f"{'holds' if v['holds'] else 'DOES NOT HOLD'}. Per round, {v['best_bf16']}'s time over blade's: "
                          f"median {paired['median']:.2f}x, p10–p90 {paired['p10']:.2f}–{paired['p90']:.2f}x."]
        for key, chosen in case["blade"].items():
            if chosen:
                times = ", ".join(f"{n} {c['ms']:.1f} ms" if "ms" in c else f"{n}: {c.get('error') or c.get('skipped')}"
                                  for n, c in chosen.get("candidates", {}).items())
                lines += ["", f"{key}: blade chose **{chosen.get('backend')}** (measured on these inputs: {times})."]
        failed = {k: s for k, s in case["status"].items() if s != "ok"}
        if failed:
            lines += ["", "Failed: " + "; ".join(f"{k}: {s}" for k, s in failed.items())]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=15, help="rounds at least (a fast case gets more)")
    parser.add_argument("--budget-s", type=float, default=90, help="timing seconds a case may take for extra rounds")
    parser.add_argument("--gap-ms", type=float, default=100)
    parser.add_argument("--cases", nargs="*", help="e.g. bert:128 gpt:256 (default: all three)")
    parser.add_argument("--save-as", help="write bench/results/<name>.{md,json} (by default only a run of all three "
                                          "cases is written, as bf16_cpu)")
    args = parser.parse_args()
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases] if args.cases else CASES
    start = time.perf_counter()
    machine = machine_info()
    peaks = measure(blade.target.detect("cpu"))
    results = []
    with tempfile.TemporaryDirectory(prefix="blade-bf16-") as tmp:
        for name, seq in cases:
            results.append(run_case(name, seq, args, peaks, Path(tmp)))
    text = render(machine, peaks, results, args, time.perf_counter() - start)
    print(text)
    name = args.save_as or (None if args.cases else "bf16_cpu")
    if name:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.md").write_text(text)
        (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine, "peaks": peaks.as_dict(),
                                                          "cases": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
