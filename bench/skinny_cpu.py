"""blade's skinny CPU linear kernel over a whole model's weights: GB/s of weight read per weight kind and rows of x.

GPT-2 base's 49 decode-step weights (12 layers of [2304|768|3072, 768] and [768, 3072], the [50257, 768] head;
495 MB fp32), as fp32, bf16 (a bf16 model's call: bf16 x, weight and output), int8 weight-only and int4 (groups of
32), each through skinny_native at 1, 2, 4 and 8 rows of x, beside torch's linear on the fp32 weights and a plain
read (torch.sum) of the fp32 and bf16 ones, interleaved round by round (median of --rounds). One process, the
machine in the header. Writes bench/results/<--out>.md/.json.

    python bench/skinny_cpu.py [--rounds 15] [--out skinny_cpu]
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

import blade.target
from blade.backends.kernels import skinny_native
from blade.ops.quantized import quantize_int4

RESULTS = Path(__file__).parent / "results"
SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]
ROWS = (1, 2, 4, 8)


def weight_sets() -> dict[str, list[tuple]]:
    """Per kind, (weight, scale or None) per layer; int4 as (packed, scales)."""
    gen = torch.Generator().manual_seed(0)
    fp32 = [torch.randn(*s, generator=gen) / 30 for s in SHAPES]
    int8 = []
    for w in fp32:
        scale = w.abs().amax(dim=1) / 127
        int8.append((torch.round(w / scale[:, None]).to(torch.int8), scale))
    return {"fp32": [(w, None) for w in fp32], "bf16": [(w.bfloat16(), None) for w in fp32], "int8": int8,
            "int4": [quantize_int4(w, 32) for w in fp32]}


def calls(sets: dict, rows: int) -> dict:
    xs = {(k, dtype): torch.randn(rows, k).to(dtype) for k in (768, 3072) for dtype in (torch.float32, torch.bfloat16)}

    def run(kind):
        if kind == "int4":
            return lambda: [skinny_native.q4linear(xs[2 * p.shape[1], torch.float32], p, s) for p, s in sets[kind]]
        dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        return lambda: [skinny_native.linear(xs[w.shape[1], dtype], w, None, s) for w, s in sets[kind]]

    out = {kind: run(kind) for kind in sets}
    out["torch_linear_fp32"] = lambda: [torch.nn.functional.linear(xs[w.shape[1], torch.float32], w)
                                        for w, _ in sets["fp32"]]
    return out


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for pair in tensors for t in pair if t is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="skinny_cpu")
    args = parser.parse_args()
    target = blade.target.detect("cpu")
    sets = weight_sets()
    size = {kind: nbytes(v) for kind, v in sets.items()}
    size["torch_linear_fp32"] = size["fp32"]
    reads = {"read_fp32": lambda: [w.sum() for w, _ in sets["fp32"]],
             "read_bf16": lambda: [w.sum() for w, _ in sets["bf16"]]}
    size.update(read_fp32=size["fp32"], read_bf16=size["bf16"])
    jobs = {("read", name): fn for name, fn in reads.items()}
    for rows in ROWS:
        jobs.update({(rows, name): fn for name, fn in calls(sets, rows).items()})
    times = {key: [] for key in jobs}
    with torch.no_grad():
        for fn in jobs.values():
            fn()
        for _ in range(args.rounds):
            for key, fn in jobs.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    rate = {f"{rows}:{name}": size[name] / statistics.median(t) / 1e9 for (rows, name), t in times.items()}
    ms = {f"{rows}:{name}": statistics.median(t) * 1e3 for (rows, name), t in times.items()}
    result = {"machine": f"{target.describe()}, torch {torch.__version__}, python {platform.python_version()}",
              "bytes": size, "gb_per_s": rate, "ms": ms,
              "command": f"python bench/skinny_cpu.py --rounds {args.rounds}"}
    kinds = ["fp32", "bf16", "int8", "int4", "torch_linear_fp32"]
    lines = [f"# blade's skinny CPU linear over GPT-2 base's decode weights (`{result['command']}`)", "",
             f"Machine: {result['machine']}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Median of "
             f"{args.rounds} interleaved rounds. Weights: " + ", ".join(f"{k} {size[k] / 1e6:.0f} MB" for k in kinds[:4])
             + f". A plain read (torch.sum) of them: fp32 **{rate['read:read_fp32']:.1f} GB/s**, bf16 "
             f"**{rate['read:read_bf16']:.1f} GB/s**.", "",
             "GB/s of weight read (ms for all 49 layers):", "",
             "| rows of x | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for rows in ROWS:
        lines.append(f"| {rows} | " + " | ".join(f"{rate[f'{rows}:{k}']:.1f} ({ms[f'{rows}:{k}']:.2f})" for k in kinds)
                     + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
