"""Pass time vs model depth: the default pass pipeline on GPT-2 at 12, 24 and 48 layers, in one run on this machine.

Two GPT-2s, each built at every depth with random weights:

* zoo -- blade.models.gpt's base config (hidden 768, 12 heads, vocab 50257) with `n_layers` set; input_ids
         [2, 256] with dynamic batch and seq, as the zoo exports it;
* hf  -- transformers' GPT2LMHeadModel(GPT2Config(n_layer=...)) (GPT-2 small otherwise, use_cache off);
         input_ids and attention_mask [1, 128], static shapes. Its GELU is written out by hand (tanh form),
         which the activations pass folds back into one op.

Each model is captured once (blade.frontend.capture). Then, `--runs` rounds, interleaved over every model
and depth (so that a busy spell on a shared machine lands on all of them alike): a gc.collect(), then
`run_pipeline(captured.graph, pipeline_for(2), CompileConfig(backend="eager"))` — the optimize=2
pipeline blade.compile runs, on its own copy of the captured graph — timed in wall and process-CPU seconds,
and each pass's seconds from its PassRecord. Medians are reported, with the ratio to the 12-layer figure
(the issue's target: 48 layers at most 4.5x the 12-layer time, for 4x the nodes). Torch runs with
`--threads` intra-op threads (default 1: the passes' tensor work — weight concatenation, causal-mask
checks — then does not fight other processes for cores).

With --compile (default on), each model is also compiled once whole: blade.compile(..., backend="eager",
cache=False), capture and accuracy check included; its report's seconds are listed.

    python bench/pass_scaling.py [--models zoo hf] [--layers 12 24 48] [--runs 5] [--no-compile]
                                 [--baseline old.json] [--label TEXT] [--out PATH]

Writes bench/results/pass_scaling.md and .json and prints the table. --baseline adds the pipeline
figures of an earlier run of this script (e.g. on an older checkout) as a "before" column.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _repo_path  # noqa: F401  (blade from this checkout when it is not installed)
import networkx
import torch
import transformers

import blade
import blade.passes
import blade.target
from blade.config import CompileConfig
from blade.frontend.capture import capture
from blade.models import gpt
from blade.passes import pipeline_for, run_pipeline

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
HF_SEQ = 128


def zoo_gpt(layers: int) -> tuple:
    """(model, example args, example kwargs, dynamic shapes) of the zoo's GPT base at `layers` layers."""
    workload = gpt.workload_for(dataclasses.replace(gpt.CONFIGS["base"], n_layers=layers))
    model, example, dims = workload.triple()
    return model, example, None, dims


def hf_gpt2(layers: int) -> tuple:
    """(model, example args, example kwargs, dynamic shapes) of transformers' GPT-2 small at `layers` layers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=layers, use_cache=False)).eval()
        ids = torch.randint(0, model.config.vocab_size, (1, HF_SEQ))
    return model, (), {"input_ids": ids, "attention_mask": torch.ones(1, HF_SEQ, dtype=torch.long)}, None


MODELS = {"zoo": zoo_gpt, "hf": hf_gpt2}


def time_pipeline(graph, config: CompileConfig) -> dict:
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    out, records = run_pipeline(graph, pipeline_for(config.optimize), config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "nodes_after": len(out), "passes": {r.name: r.seconds for r in records}}


def whole_compile(model, args, kwargs, dims) -> dict:
    compiled = blade.compile(model, args, example_kwargs=kwargs, dynamic_shapes=dims, backend="eager", cache=False)
    return {k: round(v, 3) for k, v in compiled.report.seconds.items()}


def median_of(runs: list[dict]) -> dict:
    names = list(runs[0]["passes"])
    return {"wall_s": statistics.median(r["wall"] for r in runs), "cpu_s": statistics.median(r["cpu"] for r in runs),
            "wall_runs": [round(r["wall"], 4) for r in runs],
            "passes_s": {n: statistics.median(r["passes"][n] for r in runs) for n in names}}


def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "unknown", False
    return {"machine": blade.target.detect().describe(), "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "networkx": networkx.__version__, "checkout": f"{commit}{' (with uncommitted changes)' if dirty else ''}",
            "passes_from": str(Path(blade.passes.__file__).resolve().parents[1]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def render(data: dict) -> str:
    m = data["machine"]
    lines = ["# Pass pipeline time vs GPT-2 depth", "",
             f"- machine: {m['machine']} ({m['processor']}, {m['cores']} cores, shared with other work), "
             f"torch threads {m['torch_threads']}",
             f"- versions: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
             f"networkx {m['networkx']}; checkout {m['checkout']}, {m['date']}",
             f"- command: `{data['command']}`",
             "- pipeline: `run_pipeline(captured graph, pipeline_for(2), CompileConfig(backend='eager'))`, median of "
             f"{data['runs']} interleaved runs; ratio = that depth's median / the 12-layer median; per-pass seconds "
             "are medians of the PassRecords (wall)"]
    if any("compile_s" in row for rows in data["models"].values() for row in rows):
        lines.append("- whole compile: one `blade.compile(..., backend='eager', cache=False)` per model — capture, "
                     "passes, backend and accuracy check — so mostly torch.export and the eager check; a single "
                     "run each, noisy on a shared machine")
    lines.append("")
    baseline = data.get("baseline")
    for name, rows in data["models"].items():
        first = rows[0]
        passes = list(first["passes_s"])
        head = ["layers", "nodes captured (ratio) → after passes", "pipeline wall s", "ratio", "pipeline CPU s",
                "CPU ratio"]
        if baseline:
            head += ["before: wall s", "before: ratio"]
        head += [f"{p} s" for p in passes]
        if "compile_s" in first:
            head += ["whole compile s", "compile ratio"]
        lines += [f"## {name}: {MODEL_TITLES[name]}", "", "| " + " | ".join(head) + " |",
                  "|" + "---:|" * len(head)]
        for row in rows:
            cells = [str(row["layers"]), f"{row['nodes']} ({row['nodes'] / first['nodes']:.2f}x) → {row['nodes_after']}",
                     f"{row['wall_s']:.3f}",
                     f"{row['wall_s'] / first['wall_s']:.2f}x", f"{row['cpu_s']:.3f}", f"{row['cpu_s'] / first['cpu_s']:.2f}x"]
            if baseline:
                old = {r["layers"]: r for r in baseline["models"].get(name, [])}
                old0 = old.get(first["layers"])
                mine = old.get(row["layers"])
                cells += [f"{mine['wall_s']:.3f}", f"{mine['wall_s'] / old0['wall_s']:.2f}x"] if mine and old0 else ["", ""]
            cells += [f"{row['passes_s'][p]:.3f}" for p in passes]
            if "compile_s" in row:
                cells += [f"{row['compile_s']['total']:.1f}", f"{row['compile_s']['total'] / first['compile_s']['total']:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if baseline:
        bm = baseline["machine"]
        lines += [f"Before: `{baseline.get('command', 'this script')}` on checkout {bm['checkout']} ({bm['date']}, "
                  "same machine), whose JSON the run above was given as --baseline.", ""]
    return "\n".join(lines)


MODEL_TITLES = {"zoo": "blade.models.gpt base, input_ids [2, 256], dynamic batch and seq",
                "hf": f"transformers GPT2LMHeadModel, input_ids + attention_mask [1, {HF_SEQ}], static"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--layers", nargs="+", type=int, default=[12, 24, 48])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--baseline", type=Path, help="an earlier run's JSON, shown as the 'before' column")
    parser.add_argument("--out", type=Path, default=RESULTS / "pass_scaling", help="where to write (.md, .json added)")
    parser.add_argument("--label", help="what to call the checkout measured (default: its git commit)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = CompileConfig(backend="eager")

    cases = {}
    for name in args.models:
        for layers in args.layers:
            model, example, kwargs, dims = MODELS[name](layers)
            captured = capture(model, example, kwargs, dims)
            case = {"layers": layers, "nodes": len(captured.graph), "capture_s": round(captured.seconds, 2)}
            if args.compile:
                case["compile_s"] = whole_compile(model, example, kwargs, dims)
            cases[name, layers] = (captured.graph, case, [])
            print(f"{name} {layers} layers: {case}", flush=True)
            del model

    for _ in range(args.runs):
        for graph, case, runs in cases.values():
            runs.append(time_pipeline(graph, config))
    data = {"runs": args.runs, "command": " ".join(["python bench/pass_scaling.py", *sys.argv[1:]]),
            "machine": machine(), "models": {}}
    if args.label:
        data["machine"]["checkout"] = args.label
    for (name, _), (_, case, runs) in cases.items():
        case.update(median_of(runs), nodes_after=runs[0]["nodes_after"])
        data["models"].setdefault(name, []).append(case)
    if args.baseline:
        data["baseline"] = json.loads(args.baseline.read_text())
        data["baseline"].pop("baseline", None)
    text = render(data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
