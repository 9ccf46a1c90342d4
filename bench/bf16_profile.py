"""Where bf16 time goes on CPU: blade precision="bf16" (inductor backend; outputs fp32, and bf16 with
keep_output_dtype=False) vs torch.compile of model.to(bf16) with freezing, op by op.

Zoo bert base at seq 128 and gpt base at seq 256 and 1024, batch 1 (the cases of bench/bf16_cpu.py), compiled as there,
then torch.profiler over PROFILED_CALLS calls of each, Inductor's generated kernels named
(torch._inductor.config.cpp.enable_kernel_profile). The table gives each contender's self CPU time per
call of its heaviest ops; ms per call are from the profiled calls (the profiler adds a little).

    python bench/bf16_profile.py                   # writes bench/results/bf16_profile.md
    python bench/bf16_profile.py --cases gpt:256   # one case, printed only
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import _repo_path  # noqa: F401  (blade from this checkout when it is not installed)
import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

import blade
import blade.models as zoo
from ort_cpu import machine_info, make_inputs

CASES = [("bert", 128), ("gpt", 256), ("gpt", 1024)]
PROFILED_CALLS = 3
TOP = 12
RESULTS = Path(__file__).resolve().parent / "results" / "bf16_profile.md"


def contenders(name: str, seq: int) -> dict:
    model, _, dims = zoo.get(name, "base")
    example = zoo.sample_inputs(name, "base", seed=5, batch=2, seq=seq)
    if name == "bert":  # as bench/bf16_cpu.py compiles it: no padding
        example = (example[0], torch.ones_like(example[1]))
    cm = blade.compile(model, example, dynamic_shapes=dims, precision="bf16", backend="inductor", cache=False)
    low = blade.compile(model, example, dynamic_shapes=dims, precision="bf16", backend="inductor", cache=False,
                        keep_output_dtype=False)
    inputs = make_inputs(name, seq)
    # freezing must be on when dynamo traces (torch.compile(options={"freezing": True}) comes too late to freeze)
    inductor_config.freezing = True
    peer = torch.compile(copy.deepcopy(model).to(torch.bfloat16))
    with torch.no_grad():
        peer(*inputs)
    inductor_config.freezing = False
    return {"blade_bf16": lambda: cm(*inputs), "blade_bf16_out": lambda: low(*inputs),
            "inductor_bf16": lambda: peer(*inputs)}


def profile_one(fn) -> tuple[float, list[tuple[str, float, int]]]:
    with torch.no_grad():
        for _ in range(3):
            fn()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(PROFILED_CALLS):
                fn()
        per_call_ms = (time.perf_counter() - start) / PROFILED_CALLS * 1e3
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    ops = [(e.key, e.self_cpu_time_total / PROFILED_CALLS / 1e3, e.count // PROFILED_CALLS) for e in rows
           if not e.key.startswith(("## Call CompiledFxGraph", "Torch-Compiled Region"))]
    return per_call_ms, ops[:TOP]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", help="e.g. bert:128 gpt:256 (default: all three)")
    args = parser.parse_args()
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases] if args.cases else CASES
    inductor_config.cpp.enable_kernel_profile = True
    machine = machine_info()
    lines = ["# Where bf16 time goes on CPU: blade bf16 (inductor) vs torch.compile of model.to(bf16)", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores; torch {machine['torch']}. Zoo base models, batch 1; "
             f"self CPU time per call of the heaviest ops over {PROFILED_CALLS} profiled calls "
             "(`python bench/bf16_profile.py`). Inductor's kernels are named `graph_N_cpp_fused_<ops>`.", ""]
    for name, seq in cases:
        fns = contenders(name, seq)
        lines += [f"## {name}, seq {seq}", ""]
        for name, fn in fns.items():
            per_call, ops = profile_one(fn)
            lines += [f"**{name}**: {per_call:.1f} ms per profiled call", "", "| op | ms per call | calls per call |",
                      "|---|---:|---:|"]
            lines += [f"| `{key[:70]}` | {ms:.2f} | {count} |" for key, ms, count in ops]
            lines.append("")
        del fns
        torch._dynamo.reset()
    text = "\n".join(lines)
    print(text)
    if not args.cases:
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
