"""Generation on CPU: Hugging Face generate (dynamic cache, static cache, static cache under torch.compile) vs
blade.llm (fp32, bf16, int8 and int4 weight-only), tokens/s and decode MBU, in one run on this machine.

Models (random weights, blade.models.hf_lm): GPT-2 base (124 M) and a Llama-architecture model of 134 M (GQA 12/4,
SwiGLU, RoPE). Each case: batch B of random prompts of --prompt tokens, --new new tokens, greedy, eos off
(min_new_tokens = max_new_tokens), the same prompts for every contender.

Contenders:
* hf_dynamic        model.generate(...) (DynamicCache), under torch.inference_mode
* hf_static         the same with cache_implementation="static"
* hf_static_compile the same, its decode step compiled: generation_config.compile_config = CompileConfig(
                    fullgraph=True, mode="default"), _compile_all_devices=True (transformers compiles only on CUDA
                    by default); its compile happens in the untimed warm-up call
* blade_fp32/bf16/int8  blade.llm.compile(model, max_batch=8, max_length=prompt+new, precision / quantize) once per
                    model, then lm.generate(...); int8 = quantize="int8_weight_only" with
                    accuracy_budget=0.1 (random-weight logits are flat: the 2e-2 default keeps every layer fp32);
                    int4 = quantize="int4_weight_only" (groups of 32) with accuracy_budget=0.3

Timing: a warm-up call of every contender, then --rounds rounds interleaved over the contenders (A B C ... A B C);
the median seconds of a whole generate. tokens/s = B x new / seconds. Decode figures: for blade from its own
prefill/decode split; for Hugging Face, decode seconds = the generate's seconds minus a generate of 1 new token
(prefill and setup). Decode MBU = bytes a decode step must read (every weight once, in the contender's dtype, plus
the filled part of the cache) x steps / decode seconds / the memory bandwidth blade.perf.peaks.measure reports at
the start of this run; "MBU (rounds)" divides by the median of blade.perf.peaks.memory_bandwidth measured before
each timed round of the (model, batch) group and after the last (this VM's memory speed moves within minutes). An
input embedding table that is not the head's is not counted (a step reads one row of it). Agreement = the share
of new tokens equal to blade_fp32's (greedy) at the same place.

    python bench/llm_cpu.py [--models gpt2 llama_134m] [--batches 1 8] [--prompt 32] [--new 128] [--rounds 3]
                            [--contenders ...] [--out bench/results/llm_cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import _repo_path  # noqa: F401 - import blade from this checkout
import torch
import transformers

import blade.llm
import blade.target
from blade.models import hf_lm
from blade.perf.peaks import measure, memory_bandwidth

CONTENDERS = ["hf_dynamic", "hf_static", "hf_static_compile", "blade_fp32", "blade_bf16", "blade_int8", "blade_int4"]
BLADE = {"blade_fp32": {}, "blade_bf16": {"precision": "bf16"}, "blade_int8": {"quantize": "int8_weight_only",
                                                                                   "accuracy_budget": 0.1},
         "blade_int4": {"quantize": "int4_weight_only", "accuracy_budget": 0.3}}


def hf_runner(model, kind: str):
    """generate(ids, new) for one Hugging Face variant."""
    if kind == "hf_static_compile":
        model.generation_config.compile_config = transformers.CompileConfig(fullgraph=True, mode="default")
        model.generation_config.compile_config._compile_all_devices = True
    extra = {} if kind == "hf_dynamic" else {"cache_implementation": "static"}
    if kind == "hf_static":
        extra["disable_compile"] = True

    def run(ids, new):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0, **extra)
    return run


def blade_runner(lm):
    def run(ids, new):
        return lm.generate(ids, max_new_tokens=new, min_new_tokens=new, eos_token_id=[], pad_token_id=0)
    return run


def weight_bytes(model, dtype_size: float) -> float:
    """Bytes of the parameters a decode step reads whole: all but an input embedding table not tied to the head
    (a step gathers one row of it), as blade.llm's streamed_bytes counts them."""
    table = model.get_input_embeddings().weight
    tied = table.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    seen, total = set() if tied else {table.data_ptr()}, 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * dtype_size
    return total


def run_model(name: str, args, bandwidth: float) -> list[dict]:
    model = getattr(hf_lm, name)()
    layers, kv_heads, head_dim = blade.llm.hf_step.cache_layout(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    max_length = args.prompt + args.new
    runners, compiled, setup = {}, {}, {}
    for kind in args.contenders:
        start = time.perf_counter()
        if kind in BLADE:
            lm = blade.llm.compile(model, max_batch=max(args.batches), max_length=max_length, cache=False,
                                   **BLADE[kind])
            compiled[kind] = lm
            runners[kind] = blade_runner(lm)
        else:
            # each Hugging Face variant on its own copy: generation_config and compiled forwards stay apart
            runners[kind] = hf_runner(getattr(hf_lm, name)(), kind)
        setup[kind] = time.perf_counter() - start
        print(f"   {name} {kind} setup {setup[kind]:.1f} s", flush=True)
    rows = []
    for batch in args.batches:
        ids = torch.randint(0, vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        outputs, times, prefill = {}, {k: [] for k in runners}, {}
        for kind, run in runners.items():  # warm-up (torch.compile compiles here), and the 1-token figure
            start = time.perf_counter()
            run(ids, 1)
            outputs[kind] = run(ids, args.new)
            warm = time.perf_counter() - start
            prefill[kind] = min(_seconds(lambda: run(ids, 1)) for _ in range(2))
            print(f"   {name} batch {batch} {kind} warm-up {warm:.1f} s", flush=True)
        round_bandwidths = []
        for _ in range(args.rounds):
            round_bandwidths.append(memory_bandwidth("cpu"))  # the roof beside each round: it moves within minutes
            for kind, run in runners.items():
                times[kind].append(_seconds(lambda: run(ids, args.new)))
        round_bandwidths.append(memory_bandwidth("cpu"))
        group_bandwidth = statistics.median(round_bandwidths)
        reference = outputs.get("blade_fp32")
        for kind in runners:
            seconds = statistics.median(times[kind])
            if kind in compiled:
                stats = compiled[kind].stats  # the last timed call's split
                decode_s, steps = stats.decode_s, stats.decode_steps
                step_bytes = statistics.mean(stats.step_bytes)
            else:
                decode_s, steps = seconds - prefill[kind], args.new - 1
                cache = 2 * layers * kv_heads * head_dim * 4 * batch * (args.prompt + args.new / 2)
                step_bytes = weight_bytes(model, 4) + cache
            new = outputs[kind][:, args.prompt:]
            agree = None if reference is None else float((new == reference[:, args.prompt:]).float().mean())
            rows.append({"model": name, "batch": batch, "contender": kind, "seconds": seconds, "runs": times[kind],
                         "tokens_per_s": batch * args.new / seconds, "decode_ms": 1e3 * decode_s / steps,
                         "decode_gbs": step_bytes * steps / decode_s / 1e9,
                         "decode_mbu": step_bytes * steps / decode_s / bandwidth,
                         "decode_mbu_rounds": step_bytes * steps / decode_s / group_bandwidth,
                         "bandwidth_rounds": round_bandwidths, "agreement_with_fp32": agree,
                         "setup_s": setup[kind]})
            print(f"   {name} batch {batch} {kind}: {rows[-1]['tokens_per_s']:.1f} tok/s, decode "
                  f"{rows[-1]['decode_ms']:.1f} ms/step, MBU {100 * rows[-1]['decode_mbu']:.0f}% "
                  f"({100 * rows[-1]['decode_mbu_rounds']:.0f}% of the rounds' bandwidth)"
                  + ("" if agree is None else f", agreement {100 * agree:.0f}%"), flush=True)
    return rows


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def render(data: dict) -> str:
    m = data["machine"]
    lines = ["# Generation on CPU: Hugging Face generate vs blade.llm", "",
             f"- machine: {m['target']}, {m['cores']} cores, torch threads {m['threads']}; python {m['python']}, "
             f"torch {m['torch']}, transformers {m['transformers']}; {m['date']}",
             f"- memory bandwidth measured this run (blade.perf.peaks.measure): **{data['bandwidth'] / 1e9:.0f} GB/s**",
             f"- command: `{data['command']}`; prompt {data['prompt']} tokens, {data['new']} new tokens, greedy, eos off; "
             f"median of {data['rounds']} interleaved rounds after a warm-up",
             "- decode MBU = (weights once + the filled cache) per step / decode seconds / bandwidth: MBU against the "
             "bandwidth measured at the start of the run, and 'MBU (rounds)' against the median of the bandwidth "
             "measured beside each timed round of the group (before every round and after the last); agreement = "
             "share of new tokens equal to blade_fp32's", "",
             "| model | batch | contender | tok/s | vs hf_dynamic | vs best HF | decode ms/step | decode GB/s | MBU | "
             "MBU (rounds) | agreement | setup s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, batch) in dict.fromkeys((r["model"], r["batch"]) for r in data["rows"]):
        group = [r for r in data["rows"] if (r["model"], r["batch"]) == (model, batch)]
        base = next((r["tokens_per_s"] for r in group if r["contender"] == "hf_dynamic"), None)
        best_hf = max((r["tokens_per_s"] for r in group if r["contender"].startswith("hf")), default=None)
        for r in group:
            agree = "" if r["agreement_with_fp32"] is None else f"{100 * r['agreement_with_fp32']:.0f}%"
            lines.append(
                f"| {model} | {batch} | {r['contender']} | {r['tokens_per_s']:.1f} | "
                f"{r['tokens_per_s'] / base:.2f}x | {r['tokens_per_s'] / best_hf:.2f}x | " if base and best_hf else
                f"| {model} | {batch} | {r['contender']} | {r['tokens_per_s']:.1f} | | | ")
            rounds = f"{100 * r['decode_mbu_rounds']:.0f}% of {statistics.median(r['bandwidth_rounds']) / 1e9:.0f}"
            lines[-1] += (f"{r['decode_ms']:.1f} | {r['decode_gbs']:.1f} | {100 * r['decode_mbu']:.0f}% | {rounds} | "
                          f"{agree} | {r['setup_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama_134m"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contenders", nargs="+", default=CONTENDERS, choices=CONTENDERS)
    parser.add_argument("--out", default="bench/results/llm_cpu")
    args = parser.parse_args()
    target = blade.target.detect()
    peaks = measure(target)
    print(f"peaks: {peaks.describe()}", flush=True)
    rows = []
    for name in args.models:
        rows += run_model(name, args, peaks.bandwidth)
    data = {"machine": {"target": target.describe(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__,
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
            "bandwidth": peaks.bandwidth, "command": " ".join(["python", *sys.argv]), "prompt": args.prompt,
            "new": args.new, "rounds": args.rounds, "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(render(data))
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
