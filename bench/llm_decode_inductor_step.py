"""blade.llm's decode step on the eager backend against inductor_step (its glue compiled by Inductor), paired, on CPU.

Half of a Llama-134M int4 decode step here was the ~600 small torch ops between blade's kernel calls
(bench/results/llm_decode_breakdown_llama_int4.md); inductor_step runs the same kernels and lets Inductor fuse the
rest. One process, Llama-134M (blade.models.hf_lm, random weights), max_batch 4, max_length 160, batch 1, fp32 and
int4 weights (int4 without the accuracy guard: this is about time): one blade.llm.compile (auto: the decode program
on inductor_step), and the eager backend's executable of the very same decode graph beside it (same weights, same
cache), swapped in step by step:
* compile seconds of blade.llm.compile with backend "auto" and with "eager" (Inductor compiles the decode step for
  batch 1 and for 2..4 inside the first);
* greedy tokens of 24 new tokens, batch 1 and a left-padded batch of 4, on each executable (equal?);
* decode step medians over --steps alternating pairs, and the median paired difference;
* the same with blade's linear kernels replaced by an empty output (the glue alone).
Writes bench/results/llm_decode_inductor_step.md/.json.

    python bench/llm_decode_inductor_step.py [--steps 100]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import _repo_path  # noqa: F401 - import blade from this checkout
import torch

import blade.llm
import blade.target
from blade.backends.eager import EagerExecutable
from blade.backends.kernels import skinny_native
from blade.models import hf_lm
from llm_decode_breakdown import empty_linear

RESULTS = Path(__file__).parent / "results"


def compile_seconds(model, backend: str, quantized: dict):
    started = time.perf_counter()
    lm = blade.llm.compile(model, max_batch=4, max_length=160, cache=False, backend=backend, **quantized)
    return lm, time.perf_counter() - started


def measure(quantize: str | None, steps: int) -> dict:
    torch.manual_seed(0)
    model = hf_lm.llama_134m()
    quantized = {"quantize": quantize, "check_accuracy": False} if quantize else {}
    _, eager_compile = compile_seconds(model, "eager", quantized)
    lm, auto_compile = compile_seconds(model, "auto", quantized)
    program = lm.decode_program
    executables = {"inductor_step": program.executable, "eager": EagerExecutable(program.graph)}
    assert program.backend == "inductor_step", program.backend
    prompts = torch.randint(0, model.config.vocab_size, (4, 24))
    mask = torch.ones_like(prompts)
    mask[1:, :5] = 0
    tokens = {}
    for name, executable in executables.items():
        program.executable = executable
        tokens[name] = [lm.generate(prompts[:1], max_new_tokens=24), lm.generate(prompts, mask, max_new_tokens=24)]
    same = [bool(torch.equal(a, b)) for a, b in zip(tokens["eager"], tokens["inductor_step"])]
    token, position = torch.tensor([5]), iter(range(10 ** 9))

    def paired() -> dict:
        times = {name: [] for name in executables}
        for i in range(steps):
            for name in (("eager", "inductor_step") if i % 2 else ("inductor_step", "eager")):
                program.executable = executables[name]
                begin = time.perf_counter()
                with torch.no_grad():
                    lm.decode(token, torch.tensor([40 + next(position) % 100]))
                times[name].append(time.perf_counter() - begin)
        out = {name: statistics.median(t) for name, t in times.items()}
        out["saved"] = statistics.median(a - b for a, b in zip(times["eager"], times["inductor_step"]))
        return out

    real = skinny_native.linear, skinny_native.q4linear
    try:
        full = paired()
        skinny_native.linear = empty_linear
        skinny_native.q4linear = lambda x, packed, scales, bias=None: empty_linear(x, packed)
        glue = paired()
    finally:
        skinny_native.linear, skinny_native.q4linear = real
        program.executable = executables["inductor_step"]
    return {"compile_s": {"auto": auto_compile, "eager": eager_compile}, "same_greedy_tokens": same,
            "step": full, "glue_only": glue}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    target = blade.target.detect("cpu")
    runs = {(q or "fp32"): measure(q, args.steps) for q in (None, "int4_weight_only")}
    result = {"machine": f"{target.describe()}, torch {torch.__version__}, python {platform.python_version()}",
              "model": "llama_134m", "runs": runs,
              "command": f"python bench/llm_decode_inductor_step.py --steps {args.steps}"}
    lines = [f"# blade.llm decode step: eager backend vs inductor_step, paired (`{result['command']}`)", "",
             f"Machine: {result['machine']}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Llama-134M, "
             "max_batch 4, max_length 160, batch 1; the two executables of one decode graph alternate step by step.",
             "", "| weights | eager step ms | inductor_step ms | saved (paired) ms | glue alone: eager ms | "
             "inductor_step ms | saved ms | blade.llm.compile s: auto | eager | greedy tokens equal (b1, b4 padded) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in runs.items():
        s, g = r["step"], r["glue_only"]
        lines.append(f"| {name} | {s['eager'] * 1e3:.2f} | {s['inductor_step'] * 1e3:.2f} | {s['saved'] * 1e3:.2f} | "
                     f"{g['eager'] * 1e3:.2f} | {g['inductor_step'] * 1e3:.2f} | {g['saved'] * 1e3:.2f} | "
                     f"{r['compile_s']['auto']:.1f} | {r['compile_s']['eager']:.1f} | "
                     f"{', '.join(map(str, r['same_greedy_tokens']))} |")
    fp32, int4 = runs["fp32"]["step"], runs["int4_weight_only"]["step"]
    lines += ["", f"int4 step / fp32 step speed-up: eager {fp32['eager'] / int4['eager']:.2f}x, inductor_step "
              f"{fp32['inductor_step'] / int4['inductor_step']:.2f}x."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llm_decode_inductor_step.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "llm_decode_inductor_step.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
