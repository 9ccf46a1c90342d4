"""CPU inference benchmark: blade (onnxruntime) vs eager PyTorch, torch.compile, plain ONNX Runtime and
ONNX Runtime's transformers optimizer.

For BERT-base and GPT-base (the blade zoo's hand-written models) at batch 1, BERT at sequence length
128 and 256, GPT at 128, 256 and 1024, this measures, in one run on this machine:

1. eager      -- the model under torch.inference_mode();
2. inductor   -- torch.compile(model) with torch._inductor.config.freezing = True, called under
                 torch.no_grad() (PyTorch's documented best CPU inference setting); compiled and
                 warmed up before timing, so compile time is excluded; a failure is recorded, not fatal;
3. ort        -- plain ONNX Runtime: torch.onnx.export(model, inputs, dynamo=True) of the original
                 model (static shapes, no blade), one InferenceSession with ORT_ENABLE_ALL,
                 intra_op_num_threads = os.cpu_count(), inter_op 1, sequential, CPUExecutionProvider,
                 fed numpy arrays;
4. ort_opt    -- ONNX Runtime's transformers optimizer (onnxruntime.transformers.optimizer.optimize_model,
                 model_type "bert" / "gpt2", the model's heads and hidden size) on the plain export of 3,
                 in a session with the same options; where it fails the failure is recorded;
5. blade      -- blade.compile(model, ..., backend="onnxruntime"), called as cm(*inputs): the full
                 public call path, input checks included. One compile per model (dynamic batch/seq,
                 from the zoo's example inputs) serves all its sequence lengths.

"blade vs best" = the fastest other contender's median / blade's median (1.00 or more: blade is the
fastest; the fusion issue asks for at least 0.97).

Before the timed cases it also measures a cold compile of zoo bert base (a fresh Python process:
imports done, then blade.compile, time per phase and per pass) and counts the ONNX nodes of BERT-base
as blade hands it to ONNX Runtime, as a plain export has it, and as the transformers optimizer
leaves it.

Each contender's first output is checked against eager (relative error ||out - ref|| / ||ref||),
then all are timed interleaved (A B C D A B C D ...) by blade.perf.timing.time_interleaved; the median is
reported. An untimed idle gap (--gap-ms, default 100) follows each contender: ONNX Runtime's intra-op
worker threads spin for tens of ms after a run, and on a 2-core machine that costs whichever
contender runs next about +50% (measured; see time_contenders).

Utilization, for every contender from the same figures (blade's IR of the same model):

* FLOPs and bytes per call = blade.runtime.profile.model_work on blade's compiled graph at the case's
  batch/seq: FLOPs of every matmul, attention (causal attention counts the half it computes),
  elementwise op and reduction; bytes = the least any execution must move (weights read once,
  inputs read, outputs written; an embedding reads only the rows it gathers);
* peaks = blade.perf.peaks.measure in the same run: the best 2 n^3 / t over n = 1024, 2048, 3072 and
  5 repeats of torch.matmul and of ONNX Runtime's MatMul (MLAS beats torch's fp32 GEMM on this CPU),
  and the better of a 256 MB copy and a 256 MB read for bandwidth;
* MFU = FLOPs / median time / fp32 peak, MBU = bytes / median time / memory bandwidth.

Run from the repository root, in the project's venv:

    python bench/ort_cpu.py              # full run: warm-up 3, repeat 10 (several minutes on 2 cores)
    python bench/ort_cpu.py --repeat 20  # more timed rounds
    python bench/ort_cpu.py --quick      # smoke run: warm-up 1, repeat 3, smaller peak measurement
    python bench/ort_cpu.py --ort-dynamic  # add a 5th contender: plain ORT exported with dynamic batch/seq
    python bench/ort_cpu.py --gap-ms 0   # no idle gaps: shows the spinning-thread interference
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python bench/ort_cpu.py
                                         # glibc keeps freed memory: GPT's 25-51 MB logits stop costing
                                         # ~6-12k page faults on some calls and not others

Most of a run is compiling (torch.compile per case, an ONNX export per case, one blade compile per
model), so --quick saves little; timed rounds are a minor part.

bench/ort_graph_diff.py compares blade's ONNX graph with plain exports of the same model.

The Markdown table (with a machine header) is printed and written to bench/results/ort_cpu.md; the
same numbers, and more detail, go to bench/results/ort_cpu.json. Both are overwritten (--out to change).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import blade
import blade.models as zoo
import blade.target
import blade.perf.timing
from blade.runtime.guards import check_inputs
from blade.perf.peaks import Peaks, measure
from blade.runtime.profile import model_work

CASES = [("bert", 128), ("bert", 256), ("gpt", 128), ("gpt", 256), ("gpt", 1024)]
BATCH = 1
SIZE = "base"
CONTENDERS = ("eager", "inductor", "ort", "ort_opt", "blade")
OPTIMIZER_TYPES = {"bert": "bert", "gpt": "gpt2"}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- machine and peak

def machine_info() -> dict:
    """CPU model, core count, the flags that matter for fp32/bf16 GEMM, and library versions."""
    target = blade.target.detect()
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
              "amx_int8")
    return {
        "cpu": target.name,
        "cores": os.cpu_count(),
        "flags": {f: f in flags for f in wanted},
        "target": target.describe(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "blade": blade.__version__,
        "torch_threads": torch.get_num_threads(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


# --------------------------------------------------------------------------- timing

def time_contenders(contenders: dict, warmup: int, repeat: int, gap_s: float) -> tuple[dict, dict]:
    """blade.perf.timing.time_interleaved over the contenders, an untimed idle gap after each one.

    The gaps are dummy contenders (time.sleep) whose times are dropped. Without them, the worker
    threads of one ONNX Runtime session keep spinning for tens of ms after its run and take a core
    from whichever contender runs next (on 2 cores, +50% on the next one's time).
    Returns (median seconds, per-contender sample stats) for the real contenders only; the stats
    include every timed call's ms in round order ("samples_ms") and the median minor page faults per call (a fresh multi-MB output buffer faults in every
    page, e.g. GPT's logits, depending on whether glibc gave the last one back to the OS).
    """
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    faults: dict[str, list[int]] = {name: [] for name in contenders}

    def recorded(name, fn):
        def run():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            out = fn()
            samples[name].append(time.perf_counter() - start)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            return out
        return run

    timed: dict = {}
    for i, (name, fn) in enumerate(contenders.items()):
        timed[name] = recorded(name, fn)
        if gap_s > 0:
            timed[f"_idle{i}"] = lambda: time.sleep(gap_s)
    medians = blade.perf.timing.time_interleaved(timed, warmup=warmup, repeat=repeat, device="cpu")
    stats = {}
    for name, values in samples.items():
        values = sorted(values[-repeat:])  # the timed rounds (warm-up calls come first)
        stats[name] = {"samples_ms": [t * 1e3 for t in samples[name][-repeat:]], "min": values[0] * 1e3, "max": values[-1] * 1e3,
                       "p10": values[len(values) // 10] * 1e3, "p90": values[-1 - len(values) // 10] * 1e3,
                       "minor_faults": sorted(faults[name][-repeat:])[repeat // 2]}
    return {name: medians[name] for name in contenders}, stats


# --------------------------------------------------------------------------- model FLOPs and bytes

def ir_work(cm, inputs: tuple) -> dict:
    """FLOPs and least bytes of one call from blade's IR of the model, at these inputs' sizes."""
    if cm is None:
        return {"total": float("nan"), "bytes": float("nan"), "dtype": "fp32"}
    graph = cm.graph
    flops, least, dtype = model_work(graph, check_inputs(graph.inputs, graph.dims, cm.flat_inputs(*inputs)))
    return {"total": flops, "bytes": least, "dtype": dtype}


# --------------------------------------------------------------------------- inputs and checks

def make_inputs(name: str, seq: int) -> tuple[torch.Tensor, ...]:
    """Batch-1 inputs: token ids from the zoo sampler; BERT's attention mask all ones (no padding)."""
    inputs = zoo.sample_inputs(name, SIZE, seed=0, batch=BATCH, seq=seq)
    if name == "bert":
        inputs = (inputs[0], torch.ones_like(inputs[1]))
    return inputs


def first_tensor(out) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return torch.as_tensor(out)


def rel_err(out, ref: torch.Tensor) -> float:
    out = first_tensor(out).detach().float()
    if out.shape != ref.shape:
        raise ValueError(f"output shape {list(out.shape)} != eager {list(ref.shape)}")
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


# --------------------------------------------------------------------------- contenders

@dataclass
class Contender:
    fn: object = None  # zero-argument callable, or None when it failed
    status: str = "ok"
    setup_s: float = 0.0
    extra: dict = field(default_factory=dict)


def eager_contender(model: nn.Module, inputs: tuple) -> Contender:
    def run():
        with torch.inference_mode():
            return model(*inputs)
    return Contender(run)


def inductor_contender(model: nn.Module, inputs: tuple, warmup: int) -> Contender:
    """torch.compile with freezing; compiled and warmed up here so timing sees steady state only."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()  # one static-shape compile per case (no automatic-dynamic recompile)
    inductor_config.freezing = True
    start = time.perf_counter()
    try:
        compiled = torch.compile(model)

        def run():
            with torch.no_grad():
                return compiled(*inputs)

        for _ in range(max(warmup, 2)):
            run()
    except Exception as exc:  # noqa: BLE001 -- record and go on, as the benchmark promises
        torch._dynamo.reset()
        return Contender(None, f"failed: {first_line(exc)}", time.perf_counter() - start)
    return Contender(run, "ok", time.perf_counter() - start)


def ort_session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def ort_session(path: str) -> ort.InferenceSession:
    return ort.InferenceSession(path, sess_options=ort_session_options(), providers=["CPUExecutionProvider"])


def ort_contender(model: nn.Module, export_inputs: tuple, run_inputs: tuple, workdir: Path, tag: str,
                  dynamic_shapes=None) -> Contender:
    """Plain ONNX Runtime on torch.onnx.export(dynamo=True) of the original model."""
    start = time.perf_counter()
    path = workdir / f"{tag}.onnx"
    try:
        program = torch.onnx.export(model, export_inputs, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    verbose=False)
        opset = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
        program.save(str(path), external_data=True)
        del program
        session = ort_session(str(path))
    except Exception as exc:  # noqa: BLE001
        return Contender(None, f"failed: {first_line(exc)}", time.perf_counter() - start)
    return Contender(session_runner(model, session, run_inputs), "ok", time.perf_counter() - start,
                     {"opset": opset, "onnx": str(path)})


def ort_optimizer_contender(name: str, model: nn.Module, plain: Contender, run_inputs: tuple) -> Contender:
    """ONNX Runtime's transformers optimizer on the plain export, in a session like plain ORT's."""
    if plain.fn is None:
        return Contender(None, "failed: no plain export to optimize")
    from onnxruntime.transformers.optimizer import optimize_model

    start = time.perf_counter()
    source = Path(plain.extra["onnx"])
    path = source.with_name(source.stem + "_opt.onnx")
    try:
        config = getattr(zoo, name).CONFIGS[SIZE]
        optimized = optimize_model(str(source), model_type=OPTIMIZER_TYPES[name], num_heads=config.n_heads,
                                   hidden_size=config.hidden)
        optimized.save_model_to_file(str(path), use_external_data_format=True)
        nodes = len(optimized.model.graph.node)
        session = ort_session(str(path))
    except Exception as exc:  # noqa: BLE001 -- record and go on
        return Contender(None, f"failed: {first_line(exc)}", time.perf_counter() - start)
    return Contender(session_runner(model, session, run_inputs), "ok", time.perf_counter() - start,
                     {"onnx_nodes": nodes})


def onnx_nodes(path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def session_runner(model: nn.Module, session: ort.InferenceSession, run_inputs: tuple):
    """A zero-argument call of the session on the inputs (fed by position, or by the model's names)."""
    names = [i.name for i in session.get_inputs()]
    arrays = [t.numpy() for t in run_inputs]
    feeds = dict(zip(names, arrays)) if len(names) == len(arrays) else _feeds_by_name(model, names, arrays)
    return lambda: session.run(None, feeds)


def _feeds_by_name(model: nn.Module, names: list[str], arrays: list[np.ndarray]) -> dict:
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    return {n: arrays[params.index(n)] for n in names}


def blade_compile(model: nn.Module, example_inputs: tuple, dynamic_shapes) -> tuple[object, float, dict]:
    """One blade compile per model: dynamic batch/seq, from the zoo's example inputs."""
    start = time.perf_counter()
    cm = blade.compile(model, example_inputs, dynamic_shapes=dynamic_shapes, backend="onnxruntime", cache=False)
    seconds = time.perf_counter() - start
    report = cm.report.as_dict()
    details = {"backend": report.get("backend"), "backend_details": report.get("backend_details"),
               "seconds": report.get("seconds"), "warnings": report.get("warnings"),
               "onnx_nodes": sum(onnx_nodes(cm.executable.workdir / step.file) for step in cm.executable.steps
                                 if step.file),
               "passes": {p["name"]: p["counts"] for p in report.get("passes", [])}}
    return cm, seconds, details


COLD_COMPILE = """
import json, sys, time
import blade, blade.models as zoo
model, example, dims = zoo.get(sys.argv[1], "base")
start = time.perf_counter()
cm = blade.compile(model, example, dynamic_shapes=dims, backend="onnxruntime", cache=False)
total = time.perf_counter() - start
report = cm.report.as_dict()
print(json.dumps({"total_s": total, "phases_s": report["seconds"],
                  "passes_s": {p["name"]: p["seconds"] for p in report["passes"]}}))
"""


def cold_compiles(name: str, runs: int) -> list[dict]:
    """blade.compile of zoo `name` base, each in a fresh Python process (imports excluded)."""
    import subprocess

    results = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", COLD_COMPILE, name], capture_output=True, text=True)
        if done.returncode != 0:
            results.append({"error": done.stderr.strip().splitlines()[-1:]})
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def blade_contender(cm, inputs: tuple, compile_s: float, details: dict) -> Contender:
    def run():
        return cm(*inputs)
    return Contender(run, "ok", compile_s, details)


# --------------------------------------------------------------------------- one model, its cases

def run_model(name: str, seqs: list[int], args, peak: Peaks, workdir: Path) -> list[dict]:
    """Build `name` once, compile blade once, run every sequence length, then free it all (2 cores, 24 GB)."""
    print(f"\n== {name} {SIZE}: blade compile (dynamic batch/seq) ...", flush=True)
    model, example_inputs, dynamic_shapes = zoo.get(name, SIZE)
    try:
        cm, blade_s, blade_details = blade_compile(model, example_inputs, dynamic_shapes)
        print(f"   blade compiled in {blade_s:.1f} s: {json.dumps(blade_details['backend_details'])[:300]}", flush=True)
    except Exception as exc:  # noqa: BLE001
        cm, blade_s, blade_details = None, 0.0, {"error": first_line(exc)}
        print(f"   blade compile failed: {blade_details['error']}", flush=True)

    results = []
    for seq in seqs:
        results.append(run_case(name, seq, model, example_inputs, dynamic_shapes, cm, blade_s, blade_details,
                                args, peak, workdir))
        gc.collect()
    del model, cm
    torch._dynamo.reset()
    gc.collect()
    return results


def run_case(name, seq, model, example_inputs, dynamic_shapes, cm, blade_s, blade_details, args, peak,
             workdir) -> dict:
    inputs = make_inputs(name, seq)
    print(f"-- {name} seq {seq} batch {BATCH}", flush=True)
    flops = ir_work(cm, inputs)
    with torch.inference_mode():
        ref = first_tensor(model(*inputs)).float().clone()

    contenders = {"eager": eager_contender(model, inputs),
                  "inductor": inductor_contender(model, inputs, args.warmup),
                  "ort": ort_contender(model, inputs, inputs, workdir, f"{name}_{seq}")}
    contenders["ort_opt"] = ort_optimizer_contender(name, model, contenders["ort"], inputs)
    if contenders["ort"].fn is not None:
        contenders["ort"].extra["onnx_nodes"] = onnx_nodes(contenders["ort"].extra["onnx"])
    if args.ort_dynamic:
        contenders["ort_dynamic"] = ort_contender(model, example_inputs, inputs, workdir, f"{name}_{seq}_dyn",
                                                  dynamic_shapes)
    contenders["blade"] = (blade_contender(cm, inputs, blade_s, blade_details) if cm is not None
                           else Contender(None, f"failed: {blade_details.get('error')}"))

    errors = {}
    for key, c in contenders.items():
        if c.fn is None:
            continue
        try:
            errors[key] = rel_err(c.fn(), ref)
        except Exception as exc:  # noqa: BLE001
            c.fn, c.status = None, f"failed at run: {first_line(exc)}"
    for key, c in contenders.items():
        note = f"rel_err {errors[key]:.2e}" if key in errors else c.status
        print(f"   {key:12s} setup {c.setup_s:6.1f} s  {note}", flush=True)

    live = {key: c.fn for key, c in contenders.items() if c.fn is not None}
    load_before = os.getloadavg()[0]
    medians, spread = time_contenders(live, args.warmup, args.repeat, args.gap_ms / 1e3)
    case = summarize(name, seq, flops, peak, contenders, medians, errors)
    case["spread_ms"], case["loadavg_1min"] = spread, {"before": load_before, "after": os.getloadavg()[0]}
    print("   " + "  ".join(f"{k} {v:.1f} ms" for k, v in case["ms"].items()), flush=True)
    noisy = [k for k, v in spread.items() if v["p90"] > 1.25 * v["p10"]]
    if noisy:
        print(f"   note: p90/p10 above 1.25 for {noisy}: timing is noisy (load {load_before:.2f})", flush=True)
    for c in contenders.values():
        c.fn = None
    torch._dynamo.reset()
    return case


def summarize(name, seq, flops, peak: Peaks, contenders, medians, errors) -> dict:
    ms = {k: v * 1e3 for k, v in medians.items()}
    eager = medians.get("eager")
    return {
        "model": name, "size": SIZE, "batch": BATCH, "seq": seq, "tokens": BATCH * seq,
        "flops": flops,
        "ms": ms,
        "speedup_vs_eager": {k: eager / v for k, v in medians.items()} if eager else {},
        "blade_vs_ort": (medians["ort"] / medians["blade"]) if {"ort", "blade"} <= medians.keys() else None,
        "best_peer": min((k for k in medians if k != "blade"), key=medians.get, default=None),
        "blade_vs_best": (min(v for k, v in medians.items() if k != "blade") / medians["blade"])
        if "blade" in medians and len(medians) > 1 else None,
        "mfu": {k: flops["total"] / v / peak.flops_peak(flops["dtype"])[0] for k, v in medians.items()},
        "mbu": {k: flops["bytes"] / v / peak.bandwidth for k, v in medians.items()},
        "achieved_gflops": {k: flops["total"] / v / 1e9 for k, v in medians.items()},
        "rel_err": errors,
        "status": {k: c.status for k, c in contenders.items()},
        "setup_s": {k: c.setup_s for k, c in contenders.items()},
        "extra": {k: c.extra for k, c in contenders.items() if c.extra},
    }


# --------------------------------------------------------------------------- report

def _rates(peaks: Peaks) -> str:
    return "; ".join(f"{dtype} " + ", ".join(f"{lib} {rate / 1e9:.0f}" for lib, rate in by_lib.items())
                     for dtype, by_lib in peaks.detail.items() if dtype in peaks.matmul)


def _compile_and_nodes(cases: list[dict], cold: list[dict]) -> list[str]:
    lines = []
    ok = [r for r in cold if "total_s" in r]
    if cold:
        lines.append(f"Cold compile of zoo bert base (blade.compile in a fresh process, imports excluded), "
                     f"{len(cold)} runs:")
        lines.append("")
        for r in cold:
            if "total_s" not in r:
                lines.append(f"- failed: {r.get('error')}")
                continue
            phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items() if k != "total")
            passes = ", ".join(f"{k} {v:.3f}" for k, v in r["passes_s"].items())
            lines.append(f"- **{r['total_s']:.1f} s** (phases s: {phases}; passes s: {passes})")
        if ok:
            lines.append(f"- median {sorted(r['total_s'] for r in ok)[len(ok) // 2]:.1f} s")
        lines.append("")
    bert = next((c for c in cases if c["model"] == "bert"), None)
    if bert:
        extra = bert["extra"]
        counts = {k: extra.get(k, {}).get("onnx_nodes") for k in ("ort", "ort_opt", "blade")}
        lines.append(f"ONNX nodes of bert base as handed to ONNX Runtime: blade {counts['blade']}, plain "
                     f"torch.onnx.export {counts['ort']}, transformers optimizer on that export {counts['ort_opt']}.")
        lines.append("")
        fusion = extra.get("blade", {}).get("passes", {})
        if fusion:
            lines.append("blade's passes on bert base: " + "; ".join(
                f"{name} {', '.join(f'{k} {v}' for k, v in counts.items())}" for name, counts in fusion.items()
                if counts) + ".")
            lines.append("")
    return lines


def render_markdown(machine: dict, peaks: Peaks, cases: list[dict], args, total_s: float,
                    cold: list[dict] = ()) -> str:
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in machine["flags"].items())
    names = [k for k in CONTENDERS + ("ort_dynamic",) if any(k in c["status"] for c in cases)]
    lines = [
        "# blade ONNX Runtime backend vs eager, torch.compile, plain ONNX Runtime and its transformers optimizer (CPU)",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores ({machine['target']})",
        f"- flags: {flags}",
        f"- versions: python {machine['python']}, torch {machine['torch']}, onnxruntime {machine['onnxruntime']}, "
        f"blade {machine['blade']}" + (f"; env {machine['malloc_env']}" if machine["malloc_env"] else ""),
        f"- peaks, measured this run by blade.perf.peaks.measure (best of n x n matmuls, n in {peaks.detail['sizes']}, "
        f"5 repeats): **fp32 {peaks.matmul['fp32'] / 1e9:.0f} GFLOP/s**, memory **{peaks.bandwidth / 1e9:.0f} GB/s** "
        f"(copy {peaks.detail['bandwidth']['copy'] / 1e9:.0f}, read {peaks.detail['bandwidth']['read'] / 1e9:.0f}) "
        f"(GFLOP/s by library: {_rates(peaks)})",
        f"- timing: blade.perf.timing.time_interleaved, median of {args.repeat} rounds after {args.warmup} warm-up "
        f"rounds, {args.gap_ms:g} ms untimed idle gap after each contender; batch {BATCH}; "
        f"whole run {total_s / 60:.1f} min",
        "- FLOPs and bytes per call from blade's IR of the model (blade.runtime.profile.model_work): every matmul, "
        "attention (causal: the half computed), elementwise op and reduction; bytes = the least any execution "
        "moves (weights, inputs, outputs)",
        "- MFU = FLOPs / median time / fp32 peak; MBU = bytes / median time / memory bandwidth (the better of a large copy and a large read)",
        "- contenders: eager = torch.inference_mode; inductor = torch.compile with inductor freezing, under "
        "no_grad; ort = torch.onnx.export(dynamo=True, static shapes) + ORT_ENABLE_ALL session; ort_opt = "
        "onnxruntime.transformers.optimizer on that export, same session options; blade = "
        "blade.compile(backend='onnxruntime') once per model (dynamic batch/seq), cm(*inputs)"
        + ("; ort_dynamic = ort exported with the zoo's dynamic batch/seq axes" if "ort_dynamic" in names else ""),
        "",
    ]
    header = ["case", "GFLOP"] + [f"{n} ms" for n in names] + [f"{n} vs eager" for n in names if n != "eager"]
    header += ["blade vs ort", "blade vs best (best)", "MFU " + " / ".join(names), "MBU " + " / ".join(names)]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for c in cases:
        row = [f"{c['model']} seq {c['seq']}", f"{c['flops']['total'] / 1e9:.2f}"]
        row += [f"{c['ms'][n]:.1f}" if n in c["ms"] else _short(c["status"].get(n)) for n in names]
        row += [f"{c['speedup_vs_eager'][n]:.2f}x" if n in c["speedup_vs_eager"] else "-" for n in names
                if n != "eager"]
        row.append(f"{c['blade_vs_ort']:.2f}x" if c["blade_vs_ort"] else "-")
        row.append(f"{c['blade_vs_best']:.2f}x ({c['best_peer']})" if c.get("blade_vs_best") else "-")
        for key in ("mfu", "mbu"):
            row.append(" / ".join(f"{100 * c[key][n]:.0f}%" if n in c[key] else "-" for n in names))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "x eager = eager time / contender time; blade vs ort = plain ORT time / blade time "
              "(above 1: blade faster); blade vs best = the fastest other contender's time / blade time.", ""]
    lines += _compile_and_nodes(cases, cold)
    lines += ["Relative error of the first output vs eager "
              "(BERT: last_hidden_state, GPT: logits):", ""]
    for c in cases:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in c["rel_err"].items() if k != "eager")
        lines.append(f"- {c['model']} seq {c['seq']}: {errs}")
    lines += ["", "Setup seconds (inductor: compile + warm-up; ort: export + session; blade: one compile per "
              "model, shared by its cases):", ""]
    for c in cases:
        setup = ", ".join(f"{k} {v:.0f}" for k, v in c["setup_s"].items() if k != "eager")
        lines.append(f"- {c['model']} seq {c['seq']}: {setup}")
    lines += ["", "Spread of the timed rounds, p10-p90 ms [median minor page faults per call] "
              "(1-min load average before the case):", ""]
    for c in cases:
        spread = ", ".join(f"{k} {v['p10']:.0f}-{v['p90']:.0f} [{v['minor_faults']}]" for k, v in c["spread_ms"].items())
        lines.append(f"- {c['model']} seq {c['seq']}: {spread} (load {c['loadavg_1min']['before']:.2f})")
    failed = [(c, k, s) for c in cases for k, s in c["status"].items() if s != "ok"]
    if failed:
        lines += ["", "Failures:", ""] + [f"- {c['model']} seq {c['seq']} {k}: {s}" for c, k, s in failed]
    return "\n".join(lines) + "\n"


def _short(status: str | None) -> str:
    return "failed" if status and status.startswith("failed") else "-"


def write_results(markdown: str, payload: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(markdown)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds per case (default 10; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="few rounds and a smaller peak measurement")
    parser.add_argument("--ort-dynamic", action="store_true",
                        help="also time plain ORT exported with dynamic batch/seq axes (like blade's export)")
    parser.add_argument("--gap-ms", type=float, default=100.0,
                        help="untimed idle gap after each contender, so ORT's spinning threads stop (0: none)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "ort_cpu",
                        help="write OUT.md and OUT.json (default bench/results/ort_cpu)")
    parser.add_argument("--models", nargs="+", choices=["bert", "gpt"], default=["bert", "gpt"])
    parser.add_argument("--seqs", nargs="+", type=int, default=None, help="only these sequence lengths")
    parser.add_argument("--cold-runs", type=int, default=3, help="cold compiles of bert base (0: skip)")
    args = parser.parse_args(argv)
    args.repeat = args.repeat if args.repeat is not None else (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    return args


def quiet_exporters() -> None:
    """torch.onnx logs every skipped torchvision op and torch warns about pytree internals: noise here."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    quiet_exporters()
    torch.set_num_threads(os.cpu_count() or 1)
    machine = machine_info()
    print(f"machine: {machine['target']}; torch {machine['torch']}, onnxruntime {machine['onnxruntime']}", flush=True)
    sizes, repeats = ((1024, 2048), 2) if args.quick else (None, 5)
    cold = cold_compiles("bert", args.cold_runs)
    print(f"cold compiles of bert base: {[round(r.get('total_s', float('nan')), 1) for r in cold]} s", flush=True)
    peaks = measure(blade.target.detect(), sizes, repeats)
    print(f"peaks: {peaks.describe()} ({_rates(peaks)})", flush=True)

    cases = []
    with tempfile.TemporaryDirectory(prefix="bench-ort-") as tmp:
        for name in args.models:
            seqs = [s for m, s in CASES if m == name and (args.seqs is None or s in args.seqs)]
            cases += run_model(name, seqs, args, peaks, Path(tmp))
    total = time.perf_counter() - start

    markdown = render_markdown(machine, peaks, cases, args, total, cold)
    print("\n" + markdown)
    write_results(markdown, {"machine": machine, "peaks": peaks.as_dict(), "args": vars(args), "total_s": total,
                             "cold_compile": cold, "cases": cases}, args.out)
    print(f"wrote {args.out}.md and {args.out.name}.json; total {total:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
