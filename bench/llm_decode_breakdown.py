"""Where a blade.llm decode step's time goes on CPU: the linear kernels against the memory, and the rest.

One process, --model (GPT-2 base or Llama-134M, random weights, blade.models.hf_lm), blade.llm at batch 1,
max_length 160, fp32 or --quantize's weights, --backend (auto: the decode step on inductor_step where it runs):
* the decode step as generate runs it (median of --steps steps after a warm-up);
* the decode graph on the eager backend calling every aten op through its OpOverload instead of its fast calls,
  alternating step by step with the same backend's fast calls: the median paired difference is what they save;
* the same step with blade's skinny linear kernels (fp32/int8 and int4) replaced by an empty output of the right
  shape: what is left is
  everything but the linears' arithmetic and weight reads (the graph's other ops, the kernel registry's choice,
  the wrappers), so step − this = the linears' own time;
* the skinny kernel alone on the step's weight shapes, one layer's weights at a time and all of them (larger than the
  caches), in GB/s of weight read, beside torch's linear and a plain read (torch.sum) of the same weights;
* the memory bandwidth blade.perf.peaks.measure reports now (the denominator of bench/llm_cpu.py's MBU).
The order is interleaved where it matters (step, stubbed step, step again). Writes bench/results/<--out>.md/.json.

    python bench/llm_decode_breakdown.py [--model gpt2] [--quantize int4_weight_only] [--backend auto]
                                         [--steps 40] [--out llm_decode_breakdown]
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
from blade.backends.kernels import skinny_native
from blade.models import hf_lm
from blade.perf.peaks import measure

RESULTS = Path(__file__).parent / "results"


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def empty_linear(x, weight, bias=None, scale=None):
    """The skinny kernel's call without its arithmetic: an output of the right shape and dtype."""
    return torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype)


def layer_weight_shapes(model) -> list[list[tuple[int, int]]]:
    """[out, in] of every linear (GPT-2's Conv1D transposed) in each decoder layer, in module order."""
    from transformers.pytorch_utils import Conv1D

    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList)
                  and len(m) == model.config.num_hidden_layers)
    return [[tuple(m.weight.shape) if isinstance(m, torch.nn.Linear) else tuple(m.weight.shape[::-1])
             for m in layer.modules() if isinstance(m, (torch.nn.Linear, Conv1D))] for layer in layers]


def step_times(lm, steps: int) -> dict:
    token = torch.tensor([5])
    position = iter(range(40, 10 ** 6))

    def step():
        with torch.no_grad():
            lm.decode(token, torch.tensor([next(position) % 150]))

    real, real_q4 = skinny_native.linear, skinny_native.q4linear
    out = {"step": median_seconds(step, steps)}
    skinny_native.linear = empty_linear
    skinny_native.q4linear = lambda x, packed, scales, bias=None: empty_linear(x, packed)
    try:
        out["step_without_linear_kernels"] = median_seconds(step, steps)
    finally:
        skinny_native.linear, skinny_native.q4linear = real, real_q4
    out["step_again"] = median_seconds(step, steps)
    out["fast_calls_saving"] = fast_calls_saving(lm, step, 3 * steps)
    return out


def fast_calls_saving(lm, step, pairs: int) -> float:
    """Seconds an eager-backend step saves by its fast calls: the median over alternating steps of (the decode graph
    on the eager backend calling every aten op through its OpOverload) - (the same with the fast calls)."""
    from blade.backends.eager import EagerExecutable

    program = lm.decode_program
    compiled = program.executable
    executables = {"fast": EagerExecutable(program.graph), "overloads": EagerExecutable(program.graph, fast_calls=False)}
    times = {name: [] for name in executables}
    try:
        for i in range(pairs):
            for name in (("fast", "overloads") if i % 2 else ("overloads", "fast")):
                program.executable = executables[name]
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    finally:
        program.executable = compiled
    return statistics.median(a - b for a, b in zip(times["overloads"], times["fast"]))


def gemv_rates(weights: list[torch.Tensor], repeats: int) -> dict:
    """GB/s of weight read: blade's skinny kernel, torch's linear, and a plain read, over these weights in turn."""
    inputs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    gigabytes = sum(w.numel() * w.element_size() for w in weights) / 1e9
    calls = {"skinny": lambda: [skinny_native.linear(inputs[w.shape[1]], w) for w in weights],
             "torch_linear": lambda: [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in weights],
             "read_sum": lambda: [w.sum() for w in weights]}
    return {name: gigabytes / median_seconds(fn, repeats) for name, fn in calls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", choices=["gpt2", "llama_134m"])
    parser.add_argument("--quantize", default=None, choices=["int8_weight_only", "int4_weight_only"],
                        help="weights of the step (the GB/s table is fp32 whatever this is)")
    parser.add_argument("--backend", default="auto", choices=["auto", "eager", "inductor_step"],
                        help="blade.llm.compile's backend (auto: the decode step on inductor_step where it runs)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="llm_decode_breakdown")
    args = parser.parse_args()
    torch.manual_seed(0)
    target = blade.target.detect("cpu")
    model = getattr(hf_lm, args.model)()
    quantized = {"quantize": args.quantize, "accuracy_budget": 0.3} if args.quantize else {}
    lm = blade.llm.compile(model, max_batch=1, max_length=160, cache=False, backend=args.backend, **quantized)
    lm.generate(torch.randint(0, model.config.vocab_size, (1, 32)), max_new_tokens=8)
    steps = step_times(lm, args.steps)
    layers = layer_weight_shapes(model)
    one_layer = [torch.randn(*s) for s in layers[0]]
    every_layer = [torch.randn(*s) for layer in layers for s in layer]
    head = [torch.randn(*model.get_output_embeddings().weight.shape)]
    rates = {"one layer (in cache)": gemv_rates(one_layer, 50), "all 12 layers": gemv_rates(every_layer, 10),
             "LM head": gemv_rates(head, 10)}
    bandwidth = measure(target).bandwidth
    weight_bytes = lm.weight_bytes
    options = (f" --model {args.model}" if args.model != "gpt2" else "") + \
        (f" --quantize {args.quantize}" if args.quantize else "") + \
        (f" --backend {args.backend}" if args.backend != "auto" else "")
    result = {"machine": f"{target.describe()}, torch {torch.__version__}, python {platform.python_version()}",
              "model": args.model, "quantize": args.quantize, "steps": steps, "gemv_gb_per_s": rates,
              "bandwidth_gb_per_s": bandwidth / 1e9, "weight_mb": weight_bytes / 1e6,
              "command": f"python bench/llm_decode_breakdown.py{options} --steps {args.steps}"}
    lines = [f"# blade.llm decode step on CPU, where the time goes (`{result['command']}`)", "",
             f"Machine: {result['machine']}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {args.model}, "
             f"{args.quantize or 'fp32'} weights, batch 1, the decode program on {lm.decode_program.backend}; "
             f"{weight_bytes / 1e6:.0f} MB of weights read per step.", "",
             "| decode step | ms |", "|---|---:|",
             f"| as generate runs it | {steps['step'] * 1e3:.1f} |",
             f"| linear kernels replaced by an empty output | {steps['step_without_linear_kernels'] * 1e3:.1f} |",
             f"| as generate runs it, again | {steps['step_again'] * 1e3:.1f} |",
             f"| saved by the eager backend's fast calls (paired, on that backend: every aten op through its "
             f"OpOverload − with them) | {steps['fast_calls_saving'] * 1e3:.2f} |", "",
             "| weights | blade skinny GB/s | torch linear GB/s | torch.sum (read) GB/s |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['skinny']:.1f} | {r['torch_linear']:.1f} | {r['read_sum']:.1f} |"
              for name, r in rates.items()]
    lines += ["", f"Memory bandwidth blade.perf.peaks.measure reports now: **{bandwidth / 1e9:.1f} GB/s** "
              "(the better of a 256 MB copy and read)."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
