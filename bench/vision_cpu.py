"""Real vision and diffusion networks on CPU: blade with its defaults vs eager, torch.compile and plain ONNX Runtime,
fp32 and bf16, batch 1, in one run.

The networks are blade.models.hf_vision at their reference sizes (Hugging Face ResNet-50, ConvNeXt-T, Swin-T,
MobileNetV2, RegNet-Y-4GF, EfficientNet-B0, DINOv2-S, MobileViT-S; diffusers' DDPM CIFAR-10 UNet), random weights
with calibrated batch-norm statistics. Each network runs in its own process (one at a time, so timings never
overlap). Contenders, set up as bench/ort_cpu.py sets them up and timed interleaved with idle gaps
(ort_cpu.time_contenders), median after warm-up:

- eager, inductor (torch.compile, freezing), ort (torch.onnx.export dynamo=True + ONNX Runtime, ORT_ENABLE_ALL): fp32;
- blade: blade.compile(model, example) with its defaults (backend="auto", measured; compile cache off so that the
  compile is timed), called as the user calls it;
- blade_ort, blade_ort_o1 (with --diagnose): blade on backend="onnxruntime" at optimize=2 (the default) and
  optimize=1 (cleanup only), which separates what blade's passes do to ONNX Runtime from the backend choice;
- eager_bf16, inductor_bf16: model.to(torch.bfloat16), eager and under torch.compile (freezing);
- blade_bf16: blade.compile(model, example, precision="bf16") with its defaults.

Errors are ||out - eager fp32|| / ||eager fp32|| on the timed input. Utilization: FLOPs from blade's IR / median /
the matmul peak of the contender's dtype, measured in the same run. The verdicts (issue 27): blade >= 0.97x the
fastest fp32 peer on every network and >= 1.05x geomean, errors <= 1e-4; blade_bf16 >= 1.5x the fastest fp32 peer
and >= 1.0x inductor_bf16, geomean, errors no larger than the bf16-cast model's (eager_bf16).

    python bench/vision_cpu.py                       # every network -> bench/results/vision_cpu.{md,json}
    python bench/vision_cpu.py --models resnet50 --diagnose --save-as vision_cpu_resnet50
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _repo_path  # noqa: F401  (blade from this checkout when it is not installed)
import torch

import blade
from blade.models import hf_vision
from blade.perf.peaks import measure
from ort_cpu import (eager_contender, first_line, first_tensor, inductor_contender, ir_work, machine_info,
                     ort_contender, ort_session, quiet_exporters, rel_err, session_runner, time_contenders)
from ort_cpu import Contender

RESULTS = Path(__file__).resolve().parent / "results"
FP32_PEERS = ("eager", "inductor", "ort")
BF16_PEERS = ("eager_bf16", "inductor_bf16")
BF16_KEYS = ("eager_bf16", "inductor_bf16", "blade_bf16")
BLADE_OPTIONS = {"blade": {}, "blade_ort": {"backend": "onnxruntime"},
                 "blade_ort_o1": {"backend": "onnxruntime", "optimize": 1}, "blade_bf16": {"precision": "bf16"}}
ALL = ("eager", "inductor", "ort", "blade", "blade_ort", "blade_ort_o1", "eager_bf16", "inductor_bf16", "blade_bf16")


def blade_contender(model, example, **options) -> tuple[Contender, object]:
    """blade.compile with its defaults plus `options`, the compile timed; called as cm(*example)."""
    start = time.perf_counter()
    try:
        cm = blade.compile(model, example, cache=False, **options)
    except Exception as exc:  # noqa: BLE001 -- record and go on
        return Contender(None, f"failed: {type(exc).__name__}: {exc}"[:400], time.perf_counter() - start), None
    report = cm.report
    extra = {"backend": cm.backend, "candidates": report.backend_candidates, "warnings": report.warnings,
             "light": " graph won" in report.backend_reason,
             "precisions": sorted(set(report.matmul_precision.values())),
             "passes": {p["name"]: p["counts"] for p in report.passes}, "bisection": report.bisection}
    return Contender(lambda: cm(*example), "ok", time.perf_counter() - start, extra), cm


def legacy_ort_contender(model, example, workdir: Path, name: str, why: str) -> Contender:
    """Plain ONNX Runtime on torch.onnx.export(dynamo=False) (the TorchScript exporter, opset 17), where the
    dynamo exporter failed (`why`)."""
    start = time.perf_counter()
    path = workdir / f"{name}_legacy.onnx"
    try:
        with torch.no_grad():
            torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17)
        session = ort_session(str(path))
    except Exception as exc:  # noqa: BLE001
        return Contender(None, f"{why}; TorchScript exporter: {first_line(exc)}", time.perf_counter() - start)
    return Contender(session_runner(model, session, example), "ok", time.perf_counter() - start,
                     {"exporter": f"TorchScript (dynamo failed: {why[:120]})"})


def run_network(name: str, args) -> dict:
    """Every contender of one network, set up, checked against eager fp32 and timed interleaved."""
    quiet_exporters()
    model, example, _ = hf_vision.get(name, "reference")
    with torch.inference_mode():
        ref = first_tensor(_tensors(model(*example))).float().clone()
    workdir = Path(tempfile.mkdtemp(prefix=f"vision_{name}_"))
    import torch._inductor.config as inductor_config

    wanted = set(args.only or ALL) - ({"blade_ort", "blade_ort_o1"} if not (args.diagnose or args.only) else set())
    wanted -= set(BF16_KEYS) if args.no_bf16 else set()
    low = copy.deepcopy(model).to(torch.bfloat16) if wanted & {"eager_bf16", "inductor_bf16"} else None
    low_example = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in example)
    contenders, compiled = {}, {}
    for key in ALL:
        if key not in wanted:
            continue
        if key == "eager":
            contenders[key] = eager_contender(model, example)
        elif key == "inductor":
            contenders[key] = inductor_contender(model, example, 2)
        elif key == "ort":
            contenders[key] = ort_contender(model, example, example, workdir, name)
            if contenders[key].fn is None:  # what a user tries next: the TorchScript exporter
                contenders[key] = legacy_ort_contender(model, example, workdir, name, contenders[key].status)
        elif key == "eager_bf16":
            contenders[key] = eager_contender(low, low_example)
        elif key == "inductor_bf16":
            contenders[key] = inductor_contender(low, low_example, 2)
        else:
            # blade turns Inductor's freezing on around its own calls; the user's default is off
            inductor_config.freezing = False
            contenders[key], compiled[key] = blade_contender(model, example, **BLADE_OPTIONS[key])
    cm = next((c for c in compiled.values() if c is not None), None)
    errors = {}
    for key, c in contenders.items():
        if c.fn is not None:
            errors[key] = rel_err(_tensors(c.fn()), ref)
        print(f"   {name:16s} {key:14s} setup {c.setup_s:6.1f} s  "
              f"{'rel_err %.2e' % errors[key] if key in errors else c.status}", flush=True)
    live = {key: c.fn for key, c in contenders.items() if c.fn is not None}
    medians, spread = time_contenders(live, args.warmup, args.repeat, args.gap_ms / 1e3)
    work = ir_work(cm, example) if cm is not None else {"total": float("nan")}
    rows = {}
    for key, seconds in medians.items():
        peak = args.peak_bf16 if key in BF16_KEYS else args.peak_fp32
        rows[key] = {"ms": seconds * 1e3, "rel_err": errors[key], "util": work["total"] / seconds / peak,
                     "samples_ms": spread[key]["samples_ms"], "p10_ms": spread[key]["p10"], "p90_ms": spread[key]["p90"],
                     "setup_s": contenders[key].setup_s}
    print("   " + "  ".join(f"{k} {v['ms']:.1f} ms" for k, v in rows.items()), flush=True)
    return {"network": name, "flops": work["total"], "rows": rows,
            "status": {k: c.status for k, c in contenders.items()},
            "blade": {k: c.extra for k, c in contenders.items() if k.startswith("blade")},
            "ort": contenders["ort"].extra if "ort" in contenders else {}}


def _tensors(out):
    """The network's main output: logits of a classifier, the sample of a UNet (a ModelOutput's first field)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return out


def verdicts(results: list[dict]) -> dict:
    """The issue's targets over the networks that ran: per-network ratios and the geomeans."""
    per, fp32_ratios, bf16_vs_fp32, bf16_vs_inductor, paired_fp32 = {}, [], [], [], []
    for r in results:
        rows = r.get("rows", {})
        peers = [k for k in FP32_PEERS if k in rows]
        if "blade" not in rows or not peers:
            continue
        best = min(peers, key=lambda k: rows[k]["ms"])
        entry = {"best_fp32": best, "blade_vs_best": rows[best]["ms"] / rows["blade"]["ms"],
                 "paired_vs_best": paired(rows[best], rows["blade"]), "blade_err_ok": rows["blade"]["rel_err"] <= 1e-4}
        fp32_ratios.append(entry["blade_vs_best"])
        paired_fp32.append(entry["paired_vs_best"])
        if "blade_bf16" in rows:
            entry["bf16_vs_best_fp32"] = rows[best]["ms"] / rows["blade_bf16"]["ms"]
            bf16_vs_fp32.append(entry["bf16_vs_best_fp32"])
            if "inductor_bf16" in rows:
                entry["bf16_vs_inductor_bf16"] = rows["inductor_bf16"]["ms"] / rows["blade_bf16"]["ms"]
                bf16_vs_inductor.append(entry["bf16_vs_inductor_bf16"])
            if "eager_bf16" in rows:
                entry["bf16_err_ok"] = rows["blade_bf16"]["rel_err"] <= rows["eager_bf16"]["rel_err"] * 1.25
        per[r["network"]] = entry
    geo = lambda xs: math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")  # noqa: E731
    return {"per_network": per, "fp32_geomean": geo(fp32_ratios), "fp32_worst": min(fp32_ratios, default=math.nan),
            "fp32_paired_geomean": geo(paired_fp32), "fp32_paired_worst": min(paired_fp32, default=math.nan),
            "bf16_vs_best_fp32_geomean": geo(bf16_vs_fp32), "bf16_vs_inductor_bf16_geomean": geo(bf16_vs_inductor)}


def paired(peer: dict, blade_row: dict) -> float:
    """The median over rounds of peer ms / blade ms, both timed in that round: drift between rounds (this VM's
    neighbours) moves both sides of a ratio alike."""
    ratios = sorted(p / b for p, b in zip(peer["samples_ms"], blade_row["samples_ms"]))
    return ratios[len(ratios) // 2] if ratios else math.nan


def render(machine: dict, results: list[dict], summary: dict, args, seconds: float) -> str:
    keys = [k for k in ALL if any(k in r.get("rows", {}) for r in results)]
    peaks = {"fp32": args.peak_fp32, "bf16": args.peak_bf16}
    lines = [f"# Real vision and diffusion networks on CPU (`python {' '.join(['bench/vision_cpu.py'] + sys.argv[1:])}`)",
             "", f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['target']}); torch {machine['torch']}, "
             f"onnxruntime {machine['onnxruntime']}, blade {machine['blade']}. Batch 1, median of {args.repeat} "
             f"interleaved rounds after {args.warmup} warm-up, {args.gap_ms:g} ms idle gaps. Matmul peaks measured "
             f"in this run (before the networks): fp32 {peaks.get('fp32', 0) / 1e9:.0f}, bf16 "
             f"{peaks.get('bf16', 0) / 1e9:.0f} GFLOP/s. Total {seconds / 60:.1f} min.", "",
             "ms (utilization of the dtype's peak; relative error vs eager fp32):", "",
             "| network | GFLOP | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for r in results:
        rows = r.get("rows", {})
        cells = []
        for k in keys:
            if k in rows:
                cells.append(f"{rows[k]['ms']:.1f} ({rows[k]['util']:.0%}; {rows[k]['rel_err']:.1e})")
            else:
                status = r.get("status", {}).get(k, "—")
                cells.append("—" if status in ("ok", "—") else status.split(":")[0][:20])
        lines.append(f"| {r['network']} | {r.get('flops', float('nan')) / 1e9:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Verdicts (issue 27; \"paired\": the median over rounds of the ratio within a round):", "",
              "| network | fastest fp32 peer | blade / it | paired | blade_bf16 / it | "
              "blade_bf16 / inductor_bf16 | blade ≤ 1e-4 | bf16 err ≤ cast model's |", "|---|---|---:|---:|---:|---:|---|---|"]
    for name, v in summary["per_network"].items():
        lines.append(f"| {name} | {v['best_fp32']} | {v['blade_vs_best']:.2f}x | {v['paired_vs_best']:.2f}x | "
                     f"{v.get('bf16_vs_best_fp32', float('nan')):.2f}x | {v.get('bf16_vs_inductor_bf16', float('nan')):.2f}x | "
                     f"{'yes' if v['blade_err_ok'] else 'NO'} | {'yes' if v.get('bf16_err_ok') else 'NO' if 'bf16_err_ok' in v else '—'} |")
    lines += ["", f"- fp32: blade vs the fastest peer, geomean **{summary['fp32_geomean']:.2f}x** (target ≥ 1.05), "
              f"worst **{summary['fp32_worst']:.2f}x** (target ≥ 0.97); paired: geomean "
              f"**{summary['fp32_paired_geomean']:.2f}x**, worst **{summary['fp32_paired_worst']:.2f}x**",
              f"- bf16: blade_bf16 vs the fastest fp32 peer, geomean **{summary['bf16_vs_best_fp32_geomean']:.2f}x** "
              f"(target ≥ 1.5); vs inductor_bf16 **{summary['bf16_vs_inductor_bf16_geomean']:.2f}x** (target ≥ 1.0)", "",
              "blade's choices (backend; the measured candidates, ms):", ""]
    for r in results:
        for key, extra in r.get("blade", {}).items():
            if not extra:
                lines.append(f"- {r['network']} {key}: {r['status'].get(key)}")
                continue
            cands = ", ".join(f"{n} {c['ms']:.1f}" if "ms" in c else f"{n} ({_why(c)})"
                              for n, c in (extra.get("candidates") or {}).items())
            note = "; bisection: " + str(extra["bisection"].get("outcome")) if extra.get("bisection") else ""
            won = f"{extra.get('backend')}{' (light/fp32 graph)' if extra.get('light') else ''}"
            computes = "/".join(extra.get("precisions") or [])
            lines.append(f"- {r['network']} {key}: {won}, matmuls in {computes} [{cands}]{note}")
    for r in results:
        if r.get("ort", {}).get("exporter"):
            lines.append(f"- {r['network']} ort: {r['ort']['exporter']}")
    failed = [r for r in results if "error" in r]
    for r in failed:
        lines.append(f"- {r['network']}: the run failed: {r['error']}")
    return "\n".join(lines) + "\n"


def _why(candidate: dict) -> str:
    text = candidate.get("error") or candidate.get("skipped") or "?"
    return str(text).split("\n")[0][:80]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(hf_vision.NAMES), choices=hf_vision.NAMES)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--gap-ms", type=float, default=100.0)
    parser.add_argument("--diagnose", action="store_true", help="also blade on onnxruntime at optimize 2 and 1")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--only", nargs="*", choices=ALL, help="just these contenders")
    parser.add_argument("--save-as", default="vision_cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--peak-fp32", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--peak-bf16", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:  # one network in this process; its record as the last line of stdout
        print(json.dumps(run_network(args.child, args)))
        return 0
    start, results = time.perf_counter(), []
    peaks = measure(blade.target.detect("cpu"))
    args.peak_fp32, args.peak_bf16 = peaks.flops_peak("fp32")[0], peaks.flops_peak("bf16")[0]
    passthrough = [*(argv if argv is not None else sys.argv[1:]), "--peak-fp32", str(args.peak_fp32),
                   "--peak-bf16", str(args.peak_bf16)]
    for name in args.models:
        print(f"-- {name}", flush=True)
        done = subprocess.run([sys.executable, __file__, *passthrough, "--child", name], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, BLADE_CACHE="0"))
        lines = done.stdout.strip().splitlines()
        sys.stdout.write("\n".join(lines[:-1]) + "\n")
        try:
            results.append(json.loads(lines[-1]))
        except (IndexError, json.JSONDecodeError):
            results.append({"network": name, "error": f"exit {done.returncode}"})
        gc.collect()
    summary = verdicts(results)
    machine = machine_info()
    markdown = render(machine, results, summary, args, time.perf_counter() - start)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.save_as}.md").write_text(markdown)
    (RESULTS / f"{args.save_as}.json").write_text(json.dumps({"machine": machine, "results": results,
                                                             "summary": summary}, indent=1, default=str))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
