"""blade's triton backend vs eager PyTorch and torch.compile on a CUDA GPU, in one run, with MFU and MBU.

For zoo bert, gpt, vit, dlrm and dit at `base` size in fp16 (or --dtype bf16), at batch sizes that fill a
GPU, this times (interleaved, device-synchronized, median after warm-up):

1. eager   -- model(*inputs), the model cast to the dtype;
2. inductor -- torch.compile(model) (default mode);
3. blade   -- blade.compile(model, inputs, backend="triton"): generated kernels for the fused regions,
              PyTorch (cuBLAS, SDPA-free flash attention kernel) for the rest;
4. blade_<mode> -- for bert and gpt, the same with quantize=<mode> for each of --quantize (default
              int8_dynamic and fp8): the qgemm kernels (int8 with int32 accumulation, fp8 on sm_89+) with
              their dequantization fused; a mode that fails to compile or run is reported, not fatal.

FLOPs and least bytes come from blade's IR, the peaks from blade.perf.peaks measured in the same run.
It prints and writes a Markdown table (bench/results/triton_gpu_<gpu>.md) with each contender's time,
MFU, MBU, the speedups, their geomeans (target: blade >= 2x eager, >= 1.0x torch.compile), relative
error vs eager, and blade's kernel counts.

    python bench/triton_gpu.py                 # on a CUDA GPU
    TRITON_INTERPRET=1 python bench/triton_gpu.py --smoke   # the script's own check on CPU: tiny, fp32
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
import time
from pathlib import Path

import _repo_path  # noqa: F401  (blade from this checkout when it is not installed)
import torch

import blade
import blade.models as zoo
from blade.runtime.guards import check_inputs
from blade.perf.peaks import machine_peaks, peak_dtype
from blade.runtime.profile import model_work, utilization
from blade.perf.timing import time_interleaved

RESULTS = Path(__file__).resolve().parent / "results"
# batch (and seq) at base size that keep an H100/H200 busy without running for minutes
GPU_CASES = {"bert": dict(batch=32, seq=512), "gpt": dict(batch=16, seq=1024), "vit": dict(batch=128),
             "dlrm": dict(batch=8192), "dit": dict(batch=64)}
QUANTIZED_MODELS = ("bert", "gpt")
QUANTIZED_DTYPE = {"int8_dynamic": "int8", "int8_static": "int8", "fp8": "fp8_e4m3"}  # the peak their MFU is against
SMOKE_CASES = {"bert": dict(batch=2, seq=8), "gpt": dict(batch=2, seq=8), "vit": dict(batch=2),
               "dlrm": dict(batch=4), "dit": dict(batch=2)}


def cast_inputs(inputs, dtype, device):
    return tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in inputs)


def rel_err(out, ref) -> float:
    outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    refs = [t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    worst = 0.0
    for o, r in zip(outs, refs):
        o, r = o.detach().double(), r.detach().double()
        err = float(torch.linalg.norm(o - r) / max(float(torch.linalg.norm(r)), 1e-30))
        worst = max(worst, err if err == err else math.inf)
    return worst


def widened_dynamic_shapes(name: str, size: str, dims: dict) -> tuple:
    """The zoo's dynamic shapes with each dim's range stretched to cover the sizes benchmarked (the zoo's batch
    stops at 64; a GPU needs more to be busy)."""
    work = zoo.workload(name, size)
    wide = {d: dataclasses.replace(spec, max=max(spec.max, dims.get(d, 0))) for d, spec in work.dims.items()}
    return dataclasses.replace(work, dims=wide).dynamic_shapes()


def run_case(name: str, dims: dict, dtype, device: str, args, peaks) -> dict:
    size = "tiny" if args.smoke else "base"
    model, example, _ = zoo.get(name, size)
    dynamic = widened_dynamic_shapes(name, size, dims)
    model = model.to(device=device, dtype=dtype).eval()
    inputs = cast_inputs(zoo.sample_inputs(name, "tiny" if args.smoke else "base", **dims), dtype, device)
    example = cast_inputs(example, dtype, device)
    start = time.perf_counter()
    cm = blade.compile(model, example, dynamic_shapes=dynamic, backend="triton", check_accuracy=False, cache=False)
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        reference = model(*inputs)
    contenders = {"eager": lambda: model(*inputs), "blade": lambda: cm(*inputs)}
    failures = {}
    for mode in (args.quantize if name in QUANTIZED_MODELS else []):
        try:
            qcm = blade.compile(model, example, dynamic_shapes=dynamic, backend="triton", check_accuracy=False,
                                cache=False, quantize=mode)
            with torch.no_grad():
                qcm(*inputs)
            contenders[f"blade_{mode}"] = lambda qcm=qcm: qcm(*inputs)
        except Exception as exc:  # noqa: BLE001
            failures[f"blade_{mode}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if not args.no_inductor:
        compiled = torch.compile(model)
        try:  # a contender that fails is reported, not allowed to end the run (GPU time is scarce)
            with torch.no_grad():
                compiled(*inputs)
            contenders["inductor"] = lambda: compiled(*inputs)
        except Exception as exc:  # noqa: BLE001
            failures["inductor"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    with torch.no_grad():
        medians = time_interleaved(contenders, warmup=args.warmup, repeat=args.repeat, device=device)
        errors = {k: rel_err(fn(), reference) for k, fn in contenders.items()}
    flat = cm.flat_inputs(*inputs)
    bound = check_inputs(cm.graph.inputs, cm.graph.dims, flat)
    flops, least, compute = model_work(cm.graph, bound, device=device)
    # torch's int8 matmul, which blade.perf.peaks measures int8 with, is far from the GPU's int8 roof (the kernels
    # here beat it): quantized contenders are held to the datasheet's int8/fp8 peak where there is one
    sheet = (peaks.datasheet or {}).get("matmul", {})
    roofs = dataclasses.replace(peaks, matmul={**peaks.matmul, **{d: sheet[d] for d in ("int8", "fp8_e4m3") if d in sheet}})
    figures = {k: utilization(flops, least, s, roofs if k.startswith("blade_") else peaks,
                              QUANTIZED_DTYPE.get(k.removeprefix("blade_"), compute))
               for k, s in medians.items()}
    return {"model": name, "dims": dims, "compile_s": compile_s, "ms": {k: 1e3 * s for k, s in medians.items()},
            "mfu": {k: f["mfu"] for k, f in figures.items()}, "mbu": {k: f["mbu"] for k, f in figures.items()},
            "errors": errors, "kernels": cm.report.backend_details, "flops": flops, "bytes": least,
            "failures": failures}


def geomean(values) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def render(rows: list[dict], args, device_name: str, peaks, dtype) -> str:
    names = ["eager"] + ([] if args.no_inductor else ["inductor"]) + ["blade"]
    lines = [f"# blade triton backend vs eager and torch.compile ({device_name})", "",
             f"- machine: {device_name}; python {platform.python_version()}, torch {torch.__version__}, "
             f"triton {__import__('triton').__version__}, blade {blade.__version__}",
             f"- dtype {str(dtype).removeprefix('torch.')}, zoo base models, interleaved median of {args.repeat} after "
             f"{args.warmup} warm-up, device-synchronized; FLOPs and bytes from blade's IR",
             f"- measured peaks this run: {peaks.flops_peak(peak_dtype(dtype))[0] / 1e12:.0f} TFLOP/s "
             f"{peak_dtype(dtype)}, {peaks.bandwidth / 1e9:.0f} GB/s",
             f"- command: `python bench/triton_gpu.py {' '.join(sys.argv[1:])}`", "",
             "| model | sizes | " + " | ".join(f"{n} ms" for n in names) + " | blade vs eager | blade vs inductor | "
             + " | ".join(f"{n} MFU / MBU" for n in names) + " | blade rel err | kernels (fallback regions) |",
             "|---|---|" + "---:|" * (len(names) * 2 + 3) + "---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {', '.join(f'{k} {v}' for k, v in r['dims'].items())} | failed: "
                         f"{r['error']} |")
            continue
        for n in names:  # a contender that failed shows as nan
            r["ms"].setdefault(n, float("nan"))
            r["mfu"].setdefault(n, float("nan"))
            r["mbu"].setdefault(n, float("nan"))
        vs_eager = r["ms"]["eager"] / r["ms"]["blade"]
        vs_inductor = r["ms"]["inductor"] / r["ms"]["blade"] if "inductor" in r["ms"] else float("nan")
        kernels = r["kernels"]
        lines.append(
            f"| {r['model']} | {', '.join(f'{k} {v}' for k, v in r['dims'].items())} | "
            + " | ".join(f"{r['ms'][n]:.3f}" for n in names) + f" | {vs_eager:.2f}x | {vs_inductor:.2f}x | "
            + " | ".join(f"{100 * r['mfu'][n]:.0f} % / {100 * r['mbu'][n]:.0f} %" for n in names)
            + f" | {r['errors']['blade']:.1e} | {kernels['kernels']} ({len(kernels['fallback_regions'])}) |")
    done = [r for r in rows if "error" not in r]
    lines += ["", f"Geomean blade vs eager: {geomean(r['ms']['eager'] / r['ms']['blade'] for r in done):.2f}x"
              + ("" if args.no_inductor else
                 f"; vs torch.compile: {geomean(r['ms']['inductor'] / r['ms']['blade'] for r in done):.2f}x"), ""]
    quantized = [(r, k) for r in done for k in r["ms"] if k.startswith("blade_")]
    if quantized:
        lines += ["Quantized (same inputs; MFU against the datasheet int8 / fp8 peak where known, else the measured one; error vs eager in the model's dtype):", "",
                  "| model | contender | ms | vs eager | vs blade | vs inductor | MFU | rel err |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r, k in quantized:
            lines.append(f"| {r['model']} | {k} | {r['ms'][k]:.3f} | {r['ms']['eager'] / r['ms'][k]:.2f}x | "
                         f"{r['ms']['blade'] / r['ms'][k]:.2f}x | {r['ms'].get('inductor', float('nan')) / r['ms'][k]:.2f}x"
                         f" | {100 * r['mfu'][k]:.0f} % | {r['errors'][k]:.1e} |")
        lines.append("")
    lines += [f"- {r['model']}: {name} failed: {why}" for r in done for name, why in r.get("failures", {}).items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(GPU_CASES), choices=list(GPU_CASES))
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-inductor", action="store_true", help="leave torch.compile out")
    parser.add_argument("--quantize", nargs="*", default=["int8_dynamic", "fp8"],
                        choices=["int8_weight_only", "int8_dynamic", "fp8"],
                        help="quantized blade contenders for bert and gpt (none: leave them out)")
    parser.add_argument("--smoke", action="store_true", help="tiny models in fp32 on CPU under TRITON_INTERPRET=1: "
                        "checks this script without a GPU (its figures mean nothing)")
    parser.add_argument("--out", type=Path, help="where to write the Markdown (default bench/results/)")
    args = parser.parse_args()
    if args.smoke:
        device, dtype, cases = "cpu", torch.float32, SMOKE_CASES
        args.warmup, args.repeat = 1, 2
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/triton_gpu.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 on CPU)")
        device, dtype, cases = "cuda", {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype], GPU_CASES
    target = blade.target.detect(device)
    peaks = machine_peaks(target)
    rows = []
    slug = "".join(c if c.isalnum() else "_" for c in target.name.lower()).strip("_")
    path = (args.out or RESULTS) / f"triton_gpu_{slug}.md" if (not args.smoke or args.out) else None
    for name in args.models:
        print(f"[{name}] compiling and timing", file=sys.stderr, flush=True)
        try:
            rows.append(run_case(name, cases[name], dtype, device, args, peaks))
        except Exception as exc:  # noqa: BLE001 - one model's failure must not lose the others' figures
            rows.append({"model": name, "dims": cases[name], "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        if device == "cuda":
            torch.cuda.empty_cache()
        text = render(rows, args, target.name, peaks, dtype)
        if path is not None:  # written after every model: a run cut off by a time limit keeps what it measured
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
