"""Why is blade (backend="onnxruntime") slower than plain ONNX Runtime? Compare graphs and call paths.

For one zoo model at batch 1 and one sequence length this builds these ONNX Runtime contenders,
all with the session options of bench/ort_cpu.py (ORT_ENABLE_ALL, all cores intra-op, sequential):

* blade            -- cm(*inputs): blade's full public call path;
* blade_session    -- blade's own InferenceSession called directly with numpy (no blade Python);
* ort_static       -- torch.onnx.export(model, inputs, dynamo=True): static shapes, default opset;
* ort_static18     -- the same at opset 18 (blade's opset);
* ort_dynamic      -- exported with the zoo's dynamic batch/seq axes, default opset;
* ort_dynamic18    -- dynamic axes at opset 18: the export settings blade uses, minus blade's IR round trip.

It prints each ONNX graph's op histogram before and after ORT's graph optimizations (the optimized
graph as ORT saves it with optimized_model_filepath), the ops whose counts differ from ort_static,
and the interleaved median time of every contender (with ort_cpu.py's idle gaps between them).

    python bench/ort_graph_diff.py bert 128 [--repeat 10] [--gap-ms 100]
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
import tempfile
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ort_cpu  # noqa: E402  (the benchmark's session options, inputs and helpers)

import blade  # noqa: E402
import blade.models as zoo  # noqa: E402
import blade.perf.timing  # noqa: E402


def op_histogram(path: Path) -> collections.Counter:
    model = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(f"{n.domain + '.' if n.domain not in ('', 'ai.onnx') else ''}{n.op_type}"
                              for n in model.graph.node)
    for fn in model.functions:  # the exporter may leave local functions; count their bodies once
        ops[f"(function {fn.name})"] += 1
    return ops


def optimized_histogram(path: Path, workdir: Path) -> collections.Counter:
    """Op histogram of the graph ORT actually runs (after ORT_ENABLE_ALL), as ORT writes it out."""
    out = workdir / f"{path.stem}.optimized.onnx"
    options = ort_cpu.ort_session_options()
    options.optimized_model_filepath = str(out)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     f"{out.name}.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort_cpu.ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return op_histogram(out)


def export(model, export_inputs, path: Path, dynamic_shapes=None, opset=None) -> Path:
    program = torch.onnx.export(model, export_inputs, dynamo=True, dynamic_shapes=dynamic_shapes,
                                opset_version=opset, verbose=False)
    program.save(str(path), external_data=True)
    return path


def session_runner(path: Path, inputs: tuple):
    session = ort_cpu.ort_session(str(path))
    names = [i.name for i in session.get_inputs()]
    feeds = dict(zip(names, (t.numpy() for t in inputs)))
    return lambda: session.run(None, feeds)


def blade_session_runner(cm, inputs: tuple):
    """blade's single ORT region, called straight through its InferenceSession."""
    (step,) = cm.executable.steps
    session = step.runner.session
    wanted = {i.name for i in session.get_inputs()}
    feeds = {n.name: t.numpy() for n, t in zip(cm.graph.inputs, inputs) if n.name in wanted}
    return lambda: session.run(step.runner.output_names, feeds), cm.executable.workdir / step.file


def print_histograms(hist: dict[str, collections.Counter], title: str) -> None:
    names = list(hist)
    ops = sorted(set().union(*hist.values()))
    print(f"\n{title}")
    print(f"{'op':42s}" + "".join(f"{n:>15s}" for n in names))
    for op in ops:
        counts = [hist[n].get(op, 0) for n in names]
        mark = " *" if len(set(counts)) > 1 else ""
        print(f"{op:42s}" + "".join(f"{c:15d}" for c in counts) + mark)
    print(f"{'TOTAL':42s}" + "".join(f"{sum(hist[n].values()):15d}" for n in names))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["bert", "gpt"])
    parser.add_argument("seq", type=int)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gap-ms", type=float, default=100.0, help="untimed idle gap after each contender")
    args = parser.parse_args(argv)
    ort_cpu.quiet_exporters()
    torch.set_num_threads(os.cpu_count() or 1)

    model, example_inputs, dynamic_shapes = zoo.get(args.model, "base")
    inputs = ort_cpu.make_inputs(args.model, args.seq)
    cm = blade.compile(model, example_inputs, dynamic_shapes=dynamic_shapes, backend="onnxruntime")

    with tempfile.TemporaryDirectory(prefix="bench-ortdiff-") as tmp:
        work = Path(tmp)
        blade_direct, blade_file = blade_session_runner(cm, inputs)
        files = {
            "blade": blade_file,
            "ort_static": export(model, inputs, work / "static.onnx"),
            "ort_static18": export(model, inputs, work / "static18.onnx", opset=18),
            "ort_dynamic": export(model, example_inputs, work / "dynamic.onnx", dynamic_shapes),
            "ort_dynamic18": export(model, example_inputs, work / "dynamic18.onnx", dynamic_shapes, opset=18),
        }
        print_histograms({k: op_histogram(p) for k, p in files.items()}, "ONNX ops as exported (* = counts differ)")
        print_histograms({k: optimized_histogram(p, work) for k, p in files.items()},
                         "ONNX ops after ORT_ENABLE_ALL (* = counts differ)")

        contenders = {"blade": lambda: cm(*inputs), "blade_session": blade_direct}
        contenders |= {k: session_runner(p, inputs) for k, p in files.items() if k != "blade"}
        with torch.inference_mode():
            ref = ort_cpu.first_tensor(model(*inputs)).float()
        for k, fn in contenders.items():
            print(f"{k:15s} rel_err {ort_cpu.rel_err(fn(), ref):.2e}")
        medians, spread = ort_cpu.time_contenders(contenders, args.warmup, args.repeat, args.gap_ms / 1e3)
        print(f"\n{args.model} seq {args.seq} batch 1, median of {args.repeat} interleaved, "
              f"{args.gap_ms:g} ms idle gaps:")
        base = medians["ort_static"]
        for k, v in medians.items():
            print(f"  {k:15s} {v * 1e3:8.1f} ms   {v / base:5.2f}x ort_static   "
                  f"(p10-p90 {spread[k]['p10']:.1f}-{spread[k]['p90']:.1f})")
        del contenders
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
