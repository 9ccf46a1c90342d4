"""Compile cache: a cold compile vs a cache hit, each in a fresh Python process, in one run on this machine.

For zoo models at `base` size (default bert and gpt; onnxruntime backend, dynamic batch and seq), with a
private, empty cache directory:

1. cold, cache off      -- blade.compile(..., cache=False): capture, passes, export, sessions, accuracy check;
2. cold, cache miss     -- the same with the cache on: the compile plus writing the entry;
3. hit in a new process -- the same call again in a new process: key the model, load the entry.

Each row is timed around the blade.compile call only (imports and building the model excluded), run
`--runs` times in order 1, 2, 3, 3, ... (the first miss fills the cache; later misses use a fresh
directory); medians are reported. The issue's target: a hit takes at most 10 % of the cold compile.

    python bench/compile_cache.py [--models bert gpt] [--runs 3]

Writes bench/results/compile_cache.md (with the machine) and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _repo_path  # noqa: F401  (blade from this checkout when it is not installed)
import onnxruntime as ort
import torch

import blade
import blade.target

RESULTS = Path(__file__).resolve().parent / "results" / "compile_cache.md"

WORKER = """
import json, sys, time
import _repo_path
import blade, blade.models as zoo
name, cache = sys.argv[1], sys.argv[2] == "on"
model, example, dims = zoo.get(name, "base")
start = time.perf_counter()
cm = blade.compile(model, example, dynamic_shapes=dims, backend="onnxruntime", cache=cache)
total = time.perf_counter() - start
print(json.dumps({"seconds": total, "phases": cm.report.seconds, "cache": cm.report.cache}))
"""


def one_compile(name: str, cache_dir: Path, cache: bool) -> dict:
    env = {**os.environ, "BLADE_CACHE_DIR": str(cache_dir), "BLADE_CACHE": "1"}
    done = subprocess.run([sys.executable, "-c", WORKER, name, "on" if cache else "off"], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parent)
    if done.returncode != 0:
        raise RuntimeError(f"compile of {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(name: str, runs: int, root: Path) -> dict:
    cold, miss, hit = [], [], []
    for run in range(runs):
        cold.append(one_compile(name, root / f"off{run}", cache=False))
        cache_dir = root / f"on{run}"
        miss.append(one_compile(name, cache_dir, cache=True))
        hit.append(one_compile(name, cache_dir, cache=True))
        assert miss[-1]["cache"]["hit"] is False and hit[-1]["cache"]["hit"] is True, (miss[-1], hit[-1])
        shutil.rmtree(cache_dir, ignore_errors=True)
    median = {kind: statistics.median(r["seconds"] for r in rows) for kind, rows in
              (("cold", cold), ("miss", miss), ("hit", hit))}
    return {"model": name, "runs": runs, **{f"{k}_s": v for k, v in median.items()},
            "hit_ratio": median["hit"] / median["cold"], "store_s": statistics.median(
                r["phases"].get("cache_store", 0.0) for r in miss),
            "hit_phases": {k: statistics.median(r["phases"][k] for r in hit) for k in ("cache_key", "cache_load")},
            "all": {"cold": [r["seconds"] for r in cold], "miss": [r["seconds"] for r in miss],
                    "hit": [r["seconds"] for r in hit]}}


def render(rows: list[dict], args) -> str:
    target = blade.target.detect()
    lines = [
        "# Compile cache: cold compile vs cache hit (fresh processes)",
        "",
        f"- machine: {target.describe()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"blade {blade.__version__}",
        f"- command: `python bench/compile_cache.py --models {' '.join(args.models)} --runs {args.runs}`",
        "- zoo models at base size, backend onnxruntime, dynamic batch and seq; each figure is the median over the "
        "runs of the time around `blade.compile` in a new Python process (imports and model construction excluded)",
        "",
        "| model | cold, cache off s | cold, miss + store s | hit in a new process s | hit / cold | "
        "hit: key s | hit: load s | target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        verdict = "met" if r["hit_ratio"] <= 0.10 else "NOT met"
        lines.append(f"| {r['model']} | {r['cold_s']:.2f} | {r['miss_s']:.2f} | {r['hit_s']:.3f} | "
                     f"{100 * r['hit_ratio']:.1f} % | {r['hit_phases']['cache_key']:.3f} | "
                     f"{r['hit_phases']['cache_load']:.3f} | ≤ 10 %: {verdict} |")
    lines += ["", "Every run (seconds):", ""]
    for r in rows:
        lines.append(f"- {r['model']}: cold {', '.join(f'{s:.2f}' for s in r['all']['cold'])}; miss "
                     f"{', '.join(f'{s:.2f}' for s in r['all']['miss'])}; hit "
                     f"{', '.join(f'{s:.3f}' for s in r['all']['hit'])}; writing the entry {r['store_s']:.2f} s")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bert", "gpt"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="blade-cache-bench-"))
    try:
        rows = [measure(name, args.runs, root) for name in args.models]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = render(rows, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
