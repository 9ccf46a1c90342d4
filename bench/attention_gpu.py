"""GPU attention benchmark: blade's Triton flash-attention kernel vs torch SDPA (flash backend) vs unfused.

Forward attention, fp16, head dim 64 and 128, sequence 1024 ... 16384, causal and not. Shapes follow
the FlashAttention paper: 16k tokens per batch (batch = max(1, 16384 // seq)) and hidden 2048
(heads = 2048 // head_dim). Contenders, on the same inputs:

1. blade   -- blade.backends.kernels.attention_triton.flash_attention (autotuned once per head dim
              and causal flag, at the first shape it sees: the tuning is inside the first call);
2. sdpa    -- torch.nn.functional.scaled_dot_product_attention under
              torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION) (FlashAttention-2 in torch);
3. unfused -- softmax((q @ kᵀ) * scale [masked_fill(-inf) above the diagonal when causal]) @ v in
              fp16, what eager code without SDPA runs; skipped ('oom') where its score tensors would
              need more than --unfused-limit-gb, or when CUDA runs out of memory.

Before timing a config, blade's and the unfused output are checked against SDPA's (relative error
||out - sdpa|| / ||sdpa|| below --check-tol, no NaN/inf); a failure is printed and makes the run exit 1
after the table of what was measured. Times: triton.testing.do_bench(fn, warmup=25, rep=100,
return_mode="median"). FLOPs = 4 * batch * heads * seq_q * seq_k * head_dim, halved when causal (what
a causal kernel computes). The matmul peak is the best fp16 torch.matmul TFLOP/s over 4096³ and 8192³
(and 8192 x 8192 x 16384) on random data, measured in the same run; blade's fraction of it is shown.

Run from the repository root (no install needed: bench/_repo_path.py maps the packages):

    python bench/attention_gpu.py --out bench/results          # full run (< 4 min on an H100)
    python bench/attention_gpu.py --quick --out /tmp/att       # seq 1024 and 4096 only
    python bench/attention_gpu.py --cpu-smoke --out /tmp/att   # no GPU: tiny fp32 shapes under Triton's
                                                               # interpreter, perf_counter timing; checks
                                                               # this script's logic, measures nothing

Writes attention_gpu.json and attention_gpu.md into --out.
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _repo_path  # noqa: E402,F401  (import blade from this checkout when it is not installed)

SEQS = (1024, 2048, 4096, 8192, 16384)
QUICK_SEQS = (1024, 4096)
HEAD_DIMS = (64, 128)
TOKENS, HIDDEN = 16384, 2048
MATMUL_SIZES = ((4096, 4096, 4096), (8192, 8192, 8192), (8192, 8192, 16384))
SMOKE = dict(seqs=(24, 40), head_dims=(16, 32), batch=1, heads=2, matmul_sizes=((128, 128, 128), (256, 256, 256)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="blade Triton flash attention vs SDPA flash vs unfused (GPU, fp16).",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for attention_gpu.json and attention_gpu.md (default: bench/results)")
    p.add_argument("--quick", action="store_true", help="only seq 1024 and 4096")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: tiny fp32 configs under TRITON_INTERPRET=1, perf_counter timing (checks the script)")
    p.add_argument("--unfused-limit-gb", type=float, default=40.0,
                   help="skip the unfused contender when its score tensors would need more (default 40)")
    p.add_argument("--check-tol", type=float, default=1e-2,
                   help="largest relative error vs SDPA that passes (default 1e-2)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- timing
def make_timer(smoke: bool):
    """fn -> median ms. GPU: triton's do_bench (CUDA events, L2 flushed); smoke: perf_counter."""
    if smoke:
        def timer(fn):
            fn()
            times = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)
        return timer
    from triton.testing import do_bench

    def timer(fn):
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return timer


def matmul_peak(torch, timer, sizes, device, dtype):
    """Best TFLOP/s of torch.matmul over `sizes` (m, n, k), and each size's figure."""
    each = {}
    for m, n, k in sizes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        ms = timer(lambda: torch.matmul(a, b))
        each[f"{m}x{n}x{k}"] = 2 * m * n * k / (ms * 1e-3) / 1e12
        del a, b
    return max(each.values()), each


# ------------------------------------------------------------------------------------------ contenders
def rel_error(torch, out, ref) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def unfused_bytes(batch, heads, seq, itemsize) -> int:
    """Peak bytes of the unfused pattern's [B, H, S, S] temporaries: scores, scaled (masked), softmax."""
    return 3 * batch * heads * seq * seq * itemsize


def run_config(ctx, D, S, causal):
    """Check and time one config; returns its result row (failures recorded in row['failures'])."""
    torch, F, sdpa_kernel, SDPBackend = ctx["torch"], ctx["F"], ctx["sdpa_kernel"], ctx["SDPBackend"]
    blade_attention, timer, args = ctx["blade_attention"], ctx["timer"], ctx["args"]
    dev, dtype = ctx["device"], ctx["dtype"]
    if args.cpu_smoke:
        B, H = SMOKE["batch"], SMOKE["heads"]
    else:
        B, H = max(1, TOKENS // S), HIDDEN // D
    flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
    row = dict(head_dim=D, seq=S, batch=B, heads=H, causal=causal, gflop=flops / 1e9, failures=[],
               ms={}, tflops={}, rel_err={})
    name = f"D={D} S={S} B={B} H={H}{' causal' if causal else ''}"
    row["name"] = name
    gen = torch.Generator(device=dev).manual_seed(1000 * D + S + causal)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype, generator=gen) for _ in range(3))
    scale = 1.0 / math.sqrt(D)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def blade():
        return blade_attention(q, k, v, causal=causal)

    future = None  # [S, S] True above the diagonal, made only if the unfused contender runs

    def unfused():
        s = (q @ k.transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(future, float("-inf"))
        return torch.softmax(s, dim=-1) @ v

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref = sdpa()
        row["ms"]["sdpa"] = timer(sdpa)

    try:
        out = blade()  # the first call of a (head dim, causal) key autotunes
        err = rel_error(torch, out, ref)
        row["rel_err"]["blade"] = err
        del out
        if not err < args.check_tol:
            row["failures"].append(f"{name}: blade vs SDPA relative error {err:.3g} (tolerance {args.check_tol:g})")
        row["ms"]["blade"] = timer(blade)
    except Exception as e:  # noqa: BLE001 -- recorded, reported, and fatal at the end
        traceback.print_exc()
        row["failures"].append(f"{name}: blade raised {type(e).__name__}: {e}")

    need = unfused_bytes(B, H, S, torch.finfo(dtype).bits // 8)
    if need > args.unfused_limit_gb * 1e9:
        row["ms"]["unfused"] = "oom"
    else:
        try:
            future = torch.ones(S, S, dtype=torch.bool, device=dev).triu(1) if causal else None
            out = unfused()
            err = rel_error(torch, out, ref)
            row["rel_err"]["unfused"] = err
            del out
            if not err < args.check_tol:  # the reference pattern disagreeing with SDPA: the check itself is off
                row["failures"].append(f"{name}: unfused vs SDPA relative error {err:.3g}")
            row["ms"]["unfused"] = timer(unfused)
        except Exception as e:  # noqa: BLE001
            if dev == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
                row["ms"]["unfused"] = "oom"
            else:
                traceback.print_exc()
                row["ms"]["unfused"] = "error"
                row["failures"].append(f"{name}: unfused raised {type(e).__name__}: {e}")
    del q, k, v, ref, future
    if dev == "cuda":
        torch.cuda.empty_cache()

    for who, ms in row["ms"].items():
        row["tflops"][who] = flops / (ms * 1e-3) / 1e12 if isinstance(ms, float) else ms
    b, s = row["tflops"].get("blade"), row["tflops"].get("sdpa")
    row["blade_vs_sdpa"] = b / s if isinstance(b, float) and isinstance(s, float) else None
    row["blade_of_peak"] = b / ctx["peak"] if isinstance(b, float) else None
    return row


# ----------------------------------------------------------------------------------------------- report
def fmt(x, digits=1):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}f}"


def table(rows, unit="TFLOP/s"):
    head = ["config", f"blade {unit}", f"SDPA-flash {unit}", f"unfused {unit}", "blade/SDPA", "blade/matmul peak"]
    body = []
    digits = 1 if unit == "TFLOP/s" else 4
    for r in rows:
        t = r["tflops"]
        body.append([r["name"], fmt(t.get("blade", "error"), digits), fmt(t.get("sdpa"), digits),
                     fmt(t.get("unfused", "error"), digits),
                     "-" if r["blade_vs_sdpa"] is None else f"{r['blade_vs_sdpa']:.2f}x",
                     "-" if r["blade_of_peak"] is None else f"{100 * r['blade_of_peak']:.0f}%"])
    return head, body


def print_table(head, body):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = " | ".join(h.ljust(w) for h, w in zip(head, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for b in body:
        print(" | ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(b, widths))))


def markdown(result, head, body) -> str:
    m = result["machine"]
    lines = [f"# blade Triton flash attention vs SDPA (flash) vs unfused ({m['device']})", "",
             f"- machine: {m['device']}; torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, "
             f"python {m['python']}; {m['date']}",
             f"- mode: {result['mode']}; dtype {result['dtype']}; shapes: {result['shapes']}",
             f"- timing: {result['timing']}",
             "- FLOPs = 4 · batch · heads · seq² · head_dim, halved when causal",
             f"- matmul peak ({result['dtype']} torch.matmul, best of "
             + ", ".join(f"{k}: {v:.0f}" for k, v in result["peak"]["each"].items())
             + f"): **{result['peak']['best']:.0f} TFLOP/s**",
             f"- whole run {result['total_s']:.0f} s", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(x) for x in b) + " |" for b in body]
    lines += ["", "Relative error vs SDPA (blade / unfused): "
              + "; ".join(f"{r['name']}: " + " / ".join(f"{r['rel_err'][w]:.1e}" if w in r["rel_err"] else "-"
                                                        for w in ("blade", "unfused")) for r in result["rows"])]
    if result.get("autotuned"):
        lines += ["", "Autotuned blade configs (key -> config):", ""]
        lines += [f"- {k}: {v}" for k, v in result["autotuned"].items()]
    if result["failures"]:
        lines += ["", "**FAILED CHECKS**", ""] + [f"- {f}" for f in result["failures"]]
    return "\n".join(lines) + "\n"


def autotuned(attention) -> dict:
    cache = getattr(getattr(attention, "_attn_fwd_tuned", None), "cache", None) or {}
    return {str(k): str(v) for k, v in cache.items()}


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernel module are imported
    start = time.perf_counter()
    import torch
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from blade.backends.kernels import attention_triton as attention

    if args.cpu_smoke:
        device, dtype = "cpu", torch.float32
        seqs, head_dims, sizes = SMOKE["seqs"], SMOKE["head_dims"], SMOKE["matmul_sizes"]
    else:
        if not torch.cuda.is_available():
            print("attention_gpu.py: no CUDA device (use --cpu-smoke to check the script without one)",
                  file=sys.stderr)
            return 2
        device, dtype = "cuda", torch.float16
        seqs, head_dims, sizes = (QUICK_SEQS if args.quick else SEQS), HEAD_DIMS, MATMUL_SIZES

    timer = make_timer(args.cpu_smoke)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU {platform.machine()}, Triton interpreter"
    machine = dict(device=name, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                   python=platform.python_version(),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(f"{machine['device']} | torch {machine['torch']} | triton {machine['triton']} | {machine['date']}",
          flush=True)
    best, each = matmul_peak(torch, timer, sizes, device, dtype)
    print(f"matmul peak ({str(dtype).replace('torch.', '')}): {best:.1f} TFLOP/s  ("
          + ", ".join(f"{k}: {v:.1f}" for k, v in each.items()) + ")", flush=True)

    ctx = dict(torch=torch, F=F, sdpa_kernel=sdpa_kernel, SDPBackend=SDPBackend,
               blade_attention=attention.flash_attention, timer=timer, args=args, device=device, dtype=dtype,
               peak=best)
    result = dict(mode="cpu-smoke (interpreter, perf_counter; not a measurement)" if args.cpu_smoke
                  else ("quick" if args.quick else "full"),
                  dtype=str(dtype).replace("torch.", ""), machine=machine,
                  shapes=(f"batch {SMOKE['batch']}, heads {SMOKE['heads']} (smoke)" if args.cpu_smoke else
                          "batch = max(1, 16384 // seq), heads = 2048 // head_dim (FlashAttention paper convention)"),
                  timing=("time.perf_counter, median of 3 after 1 warm-up" if args.cpu_smoke else
                          "triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median'), ms"),
                  peak=dict(best=best, each=each), rows=[], failures=[], autotuned={}, total_s=0.0)
    rows, failures = result["rows"], result["failures"]

    def write_report(final: bool):
        """JSON and Markdown of what is measured so far (after every config: a killed run leaves its rows)."""
        result.update(autotuned=autotuned(attention), total_s=time.perf_counter() - start, complete=final)
        shown = rows
        if args.cpu_smoke:  # tiny numbers: shown in GFLOP/s
            shown = [{**r, "tflops": {w: t * 1e3 if isinstance(t, float) else t for w, t in r["tflops"].items()}}
                     for r in rows]
        head, body = table(shown, "GFLOP/s" if args.cpu_smoke else "TFLOP/s")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention_gpu.json").write_text(json.dumps(result, indent=1, default=str))
        (args.out / "attention_gpu.md").write_text(markdown(result, head, body))
        return head, body

    for D in head_dims:
        for causal in (False, True):
            for S in seqs:
                try:
                    row = run_config(ctx, D, S, causal)
                except Exception as e:  # noqa: BLE001 -- e.g. SDPA itself failing: record, go on, exit 1
                    traceback.print_exc()
                    failures.append(f"D={D} S={S}{' causal' if causal else ''}: {type(e).__name__}: {e}")
                    continue
                rows.append(row)
                failures += row["failures"]
                errs = ", ".join(f"{w} {e:.1e}" for w, e in row["rel_err"].items())
                speeds = "  ".join(f"{w} {t if isinstance(t, str) else format(t, '.4g')}"
                                   for w, t in row["tflops"].items())
                print(f"{row['name']:<34} check vs SDPA: {errs or '-'}{'  FAILED' if row['failures'] else ''}"
                      f"  | {speeds}", flush=True)
                write_report(final=False)

    head, body = write_report(final=True)
    print()
    print_table(head, body)
    print(f"\nwrote {args.out / 'attention_gpu.json'} and {args.out / 'attention_gpu.md'} "
          f"({result['total_s']:.0f} s)")
    if failures:
        print("\nFAILED CHECKS:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
