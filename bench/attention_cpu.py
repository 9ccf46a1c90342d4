"""blade::flash_attention on CPU in bf16: blade's fused native kernel and its query-blocked one vs PyTorch's SDPA.

One attention layer of GPT-2/BERT base size (12 heads, head dim 64, batch 1) in bf16, q/k/v as the
strided views a fused QKV projection gives; forms: causal (GPT) and non-causal with a float padding
mask (BERT), seq 64 to 2048. Contenders, timed interleaved (blade.perf.timing.time_interleaved), median:

- sdpa: the op's reference, torch's scaled_dot_product_attention (its fused CPU flash kernel);
- blocked: backends/kernels/attention_blocked.blocked_attention (BLOCK_ROWS queries at a time, Python);
- native: backends/kernels/attention_native.attention (attention_bf16.cpp, fused per 32-query tile);
- auto: what blade::flash_attention runs on CPU, as backends/kernels/registry.py chooses (native where it runs, else
  blocked where `prefers_blocked` says so, else sdpa).

Errors are relative to fp32 SDPA on the same inputs. MFU: attention FLOPs (blade.perf.cost.attention_flops,
the causal half for causal) / median / the bf16 matmul peak measured in the same run. This chose
`prefers_blocked` in backends/kernels/attention_blocked.py, and the native kernel over both.

    python bench/attention_cpu.py    # writes bench/results/attention_cpu.md
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import _repo_path  # noqa: F401  (blade from this checkout when it is not installed)
import torch

import blade.target
from blade.backends.kernels import attention_blocked, attention_native, registry
from blade.perf.cost import attention_flops
from blade.ops.attention import attention_reference
from blade.perf.peaks import measure
from blade.perf.timing import time_interleaved
from ort_cpu import machine_info

HEADS, HEAD_DIM = 12, 64
SEQS = (64, 128, 256, 512, 1024, 2048)
RESULTS = Path(__file__).resolve().parent / "results" / "attention_cpu.md"


def layer_inputs(seq: int, causal: bool):
    """q, k, v as views of one [1, seq, 3, heads, dim] projection; BERT's float padding mask (last 8 keys)."""
    qkv = torch.randn(1, seq, 3, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    mask = None
    if not causal:
        mask = torch.zeros(1, 1, 1, seq)
        mask[..., -min(8, seq // 4):] = float("-inf")
    return q, k, v, mask


def run_case(seq: int, causal: bool, repeat: int) -> dict:
    q, k, v, mask = layer_inputs(seq, causal)
    ref = attention_reference(q.float(), k.float(), v.float(), mask, None, causal)
    fns = {"sdpa": lambda: attention_reference(q, k, v, mask, None, causal),
           "blocked": lambda: attention_blocked.blocked_attention(q, k, v, mask, None, causal),
           "native": lambda: attention_native.attention(q, k, v, mask, None, causal),
           "auto": lambda: registry.flash_attention(q, k, v, mask, None, causal)}
    with torch.no_grad():
        errors = {n: float((f().float() - ref).norm() / ref.norm()) for n, f in fns.items()}
        timings = time_interleaved(fns, warmup=3, repeat=repeat)
    flops = float(attention_flops(1, HEADS, seq, seq, HEAD_DIM, HEAD_DIM, causal))
    return {"seq": seq, "causal": causal, "flops": flops, "errors": errors,
            "ms": {n: t * 1e3 for n, t in timings.items()},
            "auto_runs": getattr(registry.choose("flash_attention", "cpu", q, k, v, mask, None, causal), "name",
                                 "sdpa")}


def render(machine, peak_bf16, cases, seconds) -> str:
    lines = ["# blade::flash_attention on CPU, bf16: native and blocked kernels vs PyTorch's fused SDPA", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores ({', '.join(k for k, v in machine['flags'].items() if v)}); "
             f"torch {machine['torch']}. One layer: batch 1, {HEADS} heads, head dim {HEAD_DIM}, bf16, q/k/v strided "
             f"views of a fused projection. bf16 matmul peak this run: {peak_bf16 / 1e9:.0f} GFLOP/s. "
             f"Median of interleaved runs; errors vs fp32 SDPA. `python bench/attention_cpu.py` ({seconds:.0f} s).", "",
             "| form | seq | sdpa ms | blocked ms | native ms | native / sdpa speed | native / blocked speed | auto runs "
             "| sdpa err | blocked err | native err | blocked MFU | native MFU |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for c in cases:
        ms = c["ms"]
        form = "causal" if c["causal"] else "padding mask"
        err = c["errors"]
        mfu = {n: f"{100 * c['flops'] / (ms[n] / 1e3) / peak_bf16:.0f} %" for n in ("blocked", "native")}
        lines.append(f"| {form} | {c['seq']} | {ms['sdpa']:.3f} | {ms['blocked']:.3f} | {ms['native']:.3f} | "
                     f"{ms['sdpa'] / ms['native']:.2f}x | {ms['blocked'] / ms['native']:.2f}x | {c['auto_runs']} | "
                     f"{err['sdpa']:.1e} | {err['blocked']:.1e} | {err['native']:.1e} | {mfu['blocked']} | "
                     f"{mfu['native']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    machine = machine_info()
    peaks = measure(blade.target.detect("cpu"))
    cases = [run_case(seq, causal, args.repeat) for causal in (True, False) for seq in SEQS]
    text = render(machine, peaks.matmul["bf16"], cases, time.perf_counter() - start)
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
