"""In-flight batching on CPU: a trace of mixed-length requests served one by one, as static batches, and by
blade.llm.Engine, on one CompiledLM; tokens/s of each and whether every request's tokens equal its run alone.

The trace: --requests requests (default 32), prompt lengths uniform in [16, 256], output lengths uniform in
[16, 256] (seeded), random prompt ids, greedy, eos off (each request makes exactly its output length).
* one_by_one  lm.generate(prompt[None], max_new_tokens=its length) for each request in turn
* static      batches of max_batch in arrival order: lm.generate on the left-padded batch with max_new_tokens = the
              longest output in it (each request then keeps its own length: what a static batch costs)
* engine      blade.llm.Engine(lm): every request submitted at once; rows refilled between decode steps
tokens/s = the trace's requested new tokens / wall seconds. "equal" = every request's engine (and static) tokens
are the one_by_one tokens.

    python bench/llm_serving_cpu.py [--model gpt2] [--requests 32] [--max-batch 8] [--out bench/results/llm_serving_cpu]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import _repo_path  # noqa: F401 - import blade from this checkout
import torch

import blade.llm
import blade.target
from blade.models import hf_lm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--out", default="bench/results/llm_serving_cpu")
    args = parser.parse_args()
    model = getattr(hf_lm, args.model)()
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(16, 257, (args.requests,), generator=gen).tolist()
    news = torch.randint(16, 257, (args.requests,), generator=gen).tolist()
    trace = [(torch.randint(0, vocab, (n,), generator=gen), new) for n, new in zip(prompts, news)]
    start = time.perf_counter()
    lm = blade.llm.compile(model, max_batch=args.max_batch, max_length=512, cache=False)
    compile_s = time.perf_counter() - start
    print(f"compiled in {compile_s:.1f} s; {len(trace)} requests, {sum(news)} new tokens", flush=True)

    start = time.perf_counter()
    alone = [lm.generate(p[None], max_new_tokens=new, eos_token_id=[])[0] for p, new in trace]
    one_s = time.perf_counter() - start
    print(f"one_by_one {one_s:.1f} s", flush=True)

    start = time.perf_counter()
    static = []
    for first in range(0, len(trace), args.max_batch):
        batch = trace[first:first + args.max_batch]
        width = max(p.numel() for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, _) in enumerate(batch):
            ids[row, width - p.numel():], mask[row, width - p.numel():] = p, 1
        out = lm.generate(ids, mask, max_new_tokens=max(new for _, new in batch), eos_token_id=[])
        static += [torch.cat([p, out[row, width:width + new]]) for row, (p, new) in enumerate(batch)]
    static_s = time.perf_counter() - start
    print(f"static {static_s:.1f} s", flush=True)

    start = time.perf_counter()
    engine = blade.llm.Engine(lm)
    ids = [engine.submit(p, new, eos_token_id=[]) for p, new in trace]
    outputs = engine.run()
    engine_s = time.perf_counter() - start
    served = [outputs[i] for i in ids]
    print(f"engine {engine_s:.1f} s in {engine.decode_steps} decode steps", flush=True)

    tokens = sum(news)
    equal = {"engine": all(torch.equal(a, b) for a, b in zip(served, alone)),
             "static": all(torch.equal(a, b) for a, b in zip(static, alone))}
    differing = {"engine": sum(not torch.equal(a, b) for a, b in zip(served, alone)),
                 "static": sum(not torch.equal(a, b) for a, b in zip(static, alone))}
    rows = [{"contender": name, "seconds": s, "tokens_per_s": tokens / s} for name, s in
            (("one_by_one", one_s), ("static", static_s), ("engine", engine_s))]
    data = {"machine": blade.target.detect().describe(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(["python", *sys.argv]),
            "model": args.model, "requests": len(trace), "new_tokens": tokens, "prompt_tokens": sum(prompts),
            "max_batch": args.max_batch, "compile_s": compile_s, "engine_decode_steps": engine.decode_steps,
            "rows": rows, "equal_to_alone": equal, "differing_requests": differing}
    lines = ["# In-flight batching on CPU: one by one, static batches, blade.llm.Engine", "",
             f"- machine: {data['machine']}, torch threads {data['threads']}; torch {data['torch']}; {data['date']}",
             f"- command: `{data['command']}`; model {args.model} fp32 (blade.llm.compile, max_batch {args.max_batch}, "
             f"max_length 512); {len(trace)} requests, prompts 16–256 ({sum(prompts)} tokens), outputs 16–256 "
             f"({tokens} tokens), greedy, eos off; one run of each", "",
             "| contender | seconds | tok/s | vs one_by_one | vs static |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['contender']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{one_s / r['seconds']:.2f}x | {static_s / r['seconds']:.2f}x |")
    lines += ["", f"Every request's tokens equal its run alone: engine {equal['engine']} "
              f"({differing['engine']} differ), static {equal['static']} ({differing['static']} differ). "
              f"The engine ran {engine.decode_steps} decode steps."]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
