"""Peak memory of zoo `gpt` base at a long sequence: eager PyTorch vs blade with the attention pass.

Eager attention materializes [batch, heads, seq, seq] scores (and the masked and softmaxed copies)
in every layer; blade's attention pass replaces them with blade::flash_attention, which does not.
This benchmark shows what that is worth on this machine's CPU, at batch 1, seq 2048 by default:

* memory -- each contender runs in a fresh child process (so allocations cannot leak between them):
  it builds the model (seeded, same weights everywhere), compiles it if it is a blade contender
  (dynamic batch/seq, compiled at the zoo's example size), records VmRSS, resets the kernel's
  peak-RSS mark (`5` into /proc/self/clear_refs), runs one forward at the measured size and reads
  VmHWM (RSS peak = VmHWM - VmRSS before the call; glibc is told to hand large freed blocks back,
  MALLOC_MMAP_THRESHOLD_). The contenders that run as PyTorch ops run once more under a dispatch
  mode that tracks the bytes of live tensor storage after every op: the activation peak is its
  maximum not counting the returned logits ([1, seq, 50257] fp32, which exist only at the very
  end, when the attention's buffers are gone, so RSS alone cannot tell the two phases apart).
* speed -- in this process, all contenders timed interleaved (blade.perf.timing.time_interleaved),
  median after warm-up, an idle gap after each so ONNX Runtime's spinning threads do not slow the
  next one; each output is checked against eager (relative error of the logits).
* utilization -- FLOPs and least bytes per forward from blade's IR of the model (the attention-pass
  graph: causal attention counts the half it computes; the same figures for every contender):
  MFU = FLOPs / median time / the fp32 matmul peak, MBU = bytes / median time / memory bandwidth (the better of a large copy and a large read),
  both peaks measured in this run by blade.perf.peaks.measure (the best of torch's and ONNX Runtime's
  square matmul).
Blade contenders in the memory children compile with check_accuracy=False, so the measured call is
the first forward the process makes (ONNX Runtime's arena starts empty); the speed process keeps it.

zoo `gpt` base allows 1024 positions; for longer sequences its position table is extended
(`max_positions = seq`), nothing else changes.

    python bench/attention_memory.py                 # seq 2048 (a few minutes on 2 cores)
    python bench/attention_memory.py --seq 1024 --repeat 5

Writes bench/results/attention_memory.md and .json (--out to change).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import blade
import blade.models.gpt as gpt
import blade.perf.timing

from blade.perf.peaks import measure
from blade.runtime.profile import model_work
from blade.target import detect
from ort_cpu import machine_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CONTENDERS = {
    "eager": None,
    "blade eager backend": dict(backend="eager"),
    "blade onnxruntime": dict(backend="onnxruntime"),
    "blade onnxruntime, no attention pass": dict(backend="onnxruntime", optimize=1),
}
MIB = 1024 * 1024


def build(seq: int):
    """zoo gpt base with room for `seq` positions, seeded weights, and its workload."""
    config = dataclasses.replace(gpt.CONFIGS["base"], max_positions=max(seq, gpt.CONFIGS["base"].max_positions))
    torch.manual_seed(0)
    workload = gpt.workload_for(config)
    model, example, dims = workload.triple()
    return model.eval(), example, dims


def compile_contender(name: str, model, example, dims, check_accuracy: bool = True):
    options = CONTENDERS[name]
    if options is None:
        def run(ids):
            with torch.inference_mode():
                return model(ids)
        return run
    return blade.compile(model, example, dynamic_shapes=dims, check_accuracy=check_accuracy, **options)


def proc_status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage that ops create and that are still alive, after every op.

    Counts what PyTorch ops allocate (weights and inputs existed before), each storage once (views
    share it), freed when its last reference goes. An op's own scratch memory inside one dispatcher
    call (the CPU flash-attention kernel's per-thread blocks, say) is not seen.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.timeline: list[tuple[int, tuple[int, ...]]] = []  # (live bytes, storages created by that op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        created = []
        read = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in read:  # a view of what the op read is no new memory
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    created.append(key)
        self.timeline.append((sum(n for _, n in self.live.values()), tuple(created)))
        return out

    def peaks(self, output: torch.Tensor) -> tuple[int, int]:
        """(peak live bytes, peak live bytes not counting the returned output's storage)."""
        out_key, out_bytes = output.untyped_storage().data_ptr(), output.untyped_storage().nbytes()
        peak = activation = 0
        output_alive = False
        for live, created in self.timeline:
            output_alive = output_alive or out_key in created
            peak = max(peak, live)
            activation = max(activation, live - (out_bytes if output_alive else 0))
        return peak, activation


def child(name: str, seq: int, out_path: str) -> None:
    """Measure one contender's peak memory for one forward; write JSON and the logits' edge rows."""
    start = proc_status_bytes("VmRSS")
    model, example, dims = build(seq)
    run = compile_contender(name, model, example, dims, check_accuracy=False)  # nothing runs before the measured call
    ids = torch.randint(0, model.token_embedding.num_embeddings, (1, seq), generator=torch.Generator().manual_seed(1))
    before = proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    logits = run(ids)
    high = proc_status_bytes("VmHWM")
    result = {"name": name, "seq": seq, "peak_bytes": high - before, "process_bytes": high - start,
              "output_bytes": logits.numel() * logits.element_size(), "rss_before": before}
    if name == "eager" or CONTENDERS[name]["backend"] == "eager":  # runs as PyTorch ops: count tensors too
        del logits
        tracker = LiveTensorBytes()
        with tracker:
            logits = run(ids)
        result["tensor_peak_bytes"], result["activation_peak_bytes"] = tracker.peaks(logits)
    torch.save({"rows": logits[0, list(range(8)) + list(range(seq - 8, seq))].clone()}, out_path + ".pt")
    Path(out_path).write_text(json.dumps(result))


def measure_memory(seq: int, workdir: Path) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    results = {}
    for i, name in enumerate(CONTENDERS):
        out = workdir / f"child{i}.json"
        subprocess.run([sys.executable, __file__, "--child", name, "--seq", str(seq), "--child-out", str(out)],
                       check=True, env=env)
        results[name] = json.loads(out.read_text())
        results[name]["rows"] = torch.load(str(out) + ".pt")["rows"]
    return results


def measure_speed(seq: int, repeat: int, gap_s: float) -> tuple[dict, dict, int]:
    model, example, dims = build(seq)
    runs = {name: compile_contender(name, model, example, dims) for name in CONTENDERS}
    ids = torch.randint(0, model.token_embedding.num_embeddings, (1, seq), generator=torch.Generator().manual_seed(1))
    reference = runs["eager"](ids)
    errors = {}
    for name, run in runs.items():
        out = run(ids)
        errors[name] = float(torch.linalg.vector_norm(out - reference) / torch.linalg.vector_norm(reference))
    timed = {}
    for i, (name, run) in enumerate(runs.items()):
        timed[name] = (lambda run=run: run(ids))
        timed[f"_idle{i}"] = lambda: time.sleep(gap_s)
    medians = blade.perf.timing.time_interleaved(timed, warmup=1, repeat=repeat, device="cpu")
    flops, least, _ = model_work(runs["blade eager backend"].graph, {"batch": 1, "seq": seq})
    return {name: medians[name] for name in CONTENDERS}, errors, {"flops": flops, "bytes": least}


def _mib(value) -> str:
    return "—" if value is None else f"{value / MIB:.0f}"


def render(machine, peaks, seq, memory, speed, errors, work, repeat) -> str:
    eager = memory["eager"]
    lines = [
        f"# Peak memory: zoo gpt base, batch 1, seq {seq}, CPU",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores; torch {machine['torch']}, "
        f"onnxruntime {machine['onnxruntime']}, blade {machine['blade']}. "
        f"Peaks measured in this run: fp32 matmul {peaks.detail['fp32']['torch'] / 1e9:.0f} GFLOP/s through torch, "
        f"{peaks.detail['fp32'].get('onnxruntime', 0) / 1e9:.0f} through ONNX Runtime (MFU is against the higher), "
        f"memory {peaks.bandwidth / 1e9:.0f} GB/s (copy {peaks.detail['bandwidth']['copy'] / 1e9:.0f}, read "
        f"{peaks.detail['bandwidth']['read'] / 1e9:.0f}). From blade's IR: {work['flops'] / 1e12:.3f} TFLOP and "
        f"{work['bytes'] / 2 ** 20:.0f} MiB (least bytes) per forward (causal attention: the half computed). "
        f"Timing: median of {repeat} interleaved runs after 1 warm-up.",
        "",
        "- **activation peak**: the most tensor memory PyTorch ops held at once during the forward, not "
        f"counting the {eager['output_bytes'] / MIB:.0f} MiB of logits the model returns (weights and inputs "
        "existed before; counted op by op, for the contenders that run as PyTorch ops).",
        "- **tensor peak**: the same with the logits.",
        "- **RSS peak**: resident memory the forward added (VmHWM - VmRSS before the call), every allocator "
        "included. ONNX Runtime reuses memory it freed while creating its session (its arena), so this "
        "understates what it needs; **process** (peak resident during the forward minus resident before the "
        "model was built: weights, every copy a backend keeps, the forward) is its footprint.",
        "",
        "| contender | activation peak MiB | × eager | tensor peak MiB | RSS peak MiB | process MiB "
        "| median s | speed vs eager | MFU | MBU | rel err vs eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in CONTENDERS:
        m = memory[name]
        activation = m.get("activation_peak_bytes")
        ratio = "—" if activation is None else f"{activation / eager['activation_peak_bytes']:.2f}"
        lines.append(
            f"| {name} | {_mib(activation)} | {ratio} | {_mib(m.get('tensor_peak_bytes'))} | "
            f"{_mib(m['peak_bytes'])} | {_mib(m['process_bytes'])} | {speed[name]:.2f} | "
            f"{speed['eager'] / speed[name]:.2f}× | {work['flops'] / speed[name] / peaks.matmul['fp32']:.0%} | "
            f"{work['bytes'] / speed[name] / peaks.bandwidth:.1%} | {errors[name]:.1e} |")
    lines += ["", "Reproduce: `python bench/attention_memory.py --seq %d --repeat %d`" % (seq, repeat), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gap-ms", type=float, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "attention_memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.seq, args.child_out)
        return 0
    machine = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        memory = measure_memory(args.seq, Path(tmp))
    rows_ref = memory["eager"]["rows"]
    for name in CONTENDERS:
        rows = memory[name].pop("rows")
        memory[name]["rows_rel_err"] = float(torch.linalg.vector_norm(rows - rows_ref) / torch.linalg.vector_norm(rows_ref))
    peaks = measure(detect(), sizes=(1024, 2048), repeats=3)
    speed, errors, work = measure_speed(args.seq, args.repeat, args.gap_ms / 1e3)
    markdown = render(machine, peaks, args.seq, memory, speed, errors, work, args.repeat)
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "peaks": peaks.as_dict(), "seq": args.seq, "memory": memory, "median_s": speed,
         "rel_err": errors, **work}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
