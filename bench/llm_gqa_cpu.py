"""What reading grouped-query K/V heads in place saves a decode step on CPU, by the cache's length.

Hugging Face's Llama attention repeats every K/V head for its query heads (`repeat_kv`: expand, then a copy) before
SDPA, so a step copies each layer's whole static cache twice. blade's attention pass reads the cache's own heads
(blade::flash_attention takes grouped heads). One process: Llama-134M (12 query / 4 key-value heads, random
weights, blade.models.hf_lm), blade.llm fp32 at batch 1, compiled twice per --lengths value: as blade does, and
with the pass told to keep the repeat (passes/attention_build.unrepeated_kv stubbed). Decode steps alternate
between the two (paired), at positions 100..149; the median step of each. Writes bench/results/<--out>.md/.json.

    python bench/llm_gqa_cpu.py [--lengths 160 1024 2048] [--steps 60] [--out llm_gqa_cpu]
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
from blade.models import hf_lm
from blade.passes import attention_build

RESULTS = Path(__file__).parent / "results"


def compile_both(model, max_length: int) -> dict:
    """{"in place": blade's program, "repeated": the same with HF's repeat of the K/V heads kept}."""
    in_place = blade.llm.compile(model, max_batch=1, max_length=max_length, cache=False)
    real = attention_build.unrepeated_kv
    attention_build.unrepeated_kv = lambda graph, k, v: None
    try:
        repeated = blade.llm.compile(model, max_batch=1, max_length=max_length, cache=False)
    finally:
        attention_build.unrepeated_kv = real
    return {"in place": in_place, "repeated": repeated}


def paired_steps(programs: dict, steps: int) -> dict:
    """Median seconds of a decode step of each program, the two alternating step by step."""
    token = torch.tensor([5])
    for lm in programs.values():
        lm.generate(torch.randint(0, 32000, (1, 32)), max_new_tokens=4)
    times = {name: [] for name in programs}
    names = list(programs)
    with torch.no_grad():
        for i in range(steps + 4):
            for name in (names if i % 2 else names[::-1]):
                position = torch.tensor([100 + i % 50])
                start = time.perf_counter()
                programs[name].decode(token, position)
                if i >= 4:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[160, 1024, 2048])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="llm_gqa_cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    target = blade.target.detect("cpu")
    model = hf_lm.llama_134m()
    rows = []
    for length in args.lengths:
        medians = paired_steps(compile_both(model, length), args.steps)
        cache_mb = 2 * 12 * 4 * length * 64 * 4 / 1e6  # keys and values, 12 layers, 4 heads, head dim 64, fp32
        rows.append({"max_length": length, "cache_mb": cache_mb, **{k: v * 1e3 for k, v in medians.items()}})
        print(rows[-1], flush=True)
    command = f"python bench/llm_gqa_cpu.py --lengths {' '.join(map(str, args.lengths))} --steps {args.steps}"
    machine = f"{target.describe()}, torch {torch.__version__}, python {platform.python_version()}"
    lines = [f"# Grouped-query heads read in place vs repeated, a Llama-134M decode step on CPU (`{command}`)", "",
             f"Machine: {machine}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. fp32, batch 1; the repeat "
             "copies the static cache (its whole max_length) twice a layer every step.", "",
             "| max_length | static cache MB | step ms, heads read in place (blade) | step ms, HF's repeat kept | "
             "speedup |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['max_length']} | {r['cache_mb']:.0f} | {r['in place']:.2f} | {r['repeated']:.2f} | "
              f"{r['repeated'] / r['in place']:.2f}x |" for r in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"machine": machine, "command": command, "rows": rows},
                                                         indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
