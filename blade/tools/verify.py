"""The accuracy gate of a pipeline: a compiled model against its source, on given or fresh inputs."""
from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.utils._pytree as pytree

from blade.perf.accuracy import compare_tensor
from blade.ir.graph import Graph
from blade.ir.shapes import evaluate

FRESH_MAX_GROWTH = 2  # fresh dynamic sizes stay within 2x the example's, to keep a gate quick


def fresh_inputs(graph: Graph, examples: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """Random inputs of the graph's spec: each dynamic dim drawn inside its range (and at most
    FRESH_MAX_GROWTH times the example's size); floating inputs from a normal distribution, integer
    and bool inputs drawn from the example's own values (token ids stay valid ids, masks 0/1)."""
    chosen: dict[str, int] = {}
    for node, example in zip(graph.user_inputs, examples):
        for size, got in zip(node.val.shape, example.shape):
            if isinstance(size, int) or not size.is_Symbol or size.name in chosen:
                continue
            rng = graph.dims.get(size.name)
            low = max(rng.min if rng else 1, 1)
            high = got * FRESH_MAX_GROWTH
            if rng and rng.max is not None:
                high = min(high, rng.max)
            chosen[size.name] = int(torch.randint(low, max(high, low) + 1, (), generator=generator))
    tensors = []
    for node, example in zip(graph.user_inputs, examples):
        try:
            shape = tuple(int(evaluate(s, chosen)) for s in node.val.shape)
        except (KeyError, TypeError, ValueError):  # a dim only derived from others: keep the example's
            shape = tuple(example.shape)
        if example.dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=generator).to(example.dtype))
        else:
            values = example.reshape(-1)
            picks = torch.randint(0, values.numel(), shape, generator=generator)
            tensors.append(values[picks])
    return tensors


def compare(compiled, reference, inputs: list[torch.Tensor]) -> list[dict]:
    """Per output: blade.perf.accuracy's figures (relative error, max abs, cosine) of compiled vs reference."""
    args, kwargs = compiled.signature.unflatten_inputs(inputs)
    with torch.no_grad():
        expected = pytree.tree_leaves(reference(*args, **kwargs))
    got = compiled.run_flat(inputs)
    if len(got) != len(expected):
        return [{"index": "count", "rel_err": math.inf,
                 "note": f"compiled gives {len(got)} outputs, the source {len(expected)}"}]
    declared = compiled.graph.output_dtypes()
    return [asdict(compare_tensor(i, out, ref, declared=d)) for i, (out, ref, d) in enumerate(zip(got, expected, declared))]


def verify(compiled, reference, input_sets: list[tuple[str, list[torch.Tensor]]], tol: float) -> dict:
    """Run both on every input set; ok when every output of every set is within `tol` (NaN fails)."""
    samples = []
    for name, inputs in input_sets:
        rows = compare(compiled, reference, inputs)
        worst = max((r["rel_err"] for r in rows), default=0.0)
        ok = all(not math.isnan(r["rel_err"]) and r["rel_err"] <= tol for r in rows)
        samples.append({"inputs": name, "shapes": [list(t.shape) for t in inputs], "worst_rel_err": worst,
                        "ok": ok, "outputs": rows})
    return {"ok": all(s["ok"] for s in samples), "tolerance": tol, "samples": samples}


def bisect_artifact(compiled, source, inputs: list[torch.Tensor], tol: float, passes: list | None = None):
    """The accuracy bisection for an artifact that fails its gate on `inputs`: the source (a module:factory triple
    or a .pt2 path) is captured and compiled again as the artifact was (backend, level, precision, quantization,
    the layers its guard kept), with rewrites held back until `inputs` pass within `tol`. Returns the
    blade.driver.bisect.Bisection and a CompiledModel of the repaired compile (the artifact's signature and examples)."""
    from blade import backends
    from blade import passes as pipelines
    from blade.perf.accuracy import Judge
    from blade.driver.bisect import bisect
    from blade.frontend.capture import capture
    from blade.runtime.compiled import CompiledModel
    from blade.config import CompileConfig
    from blade.errors import ConfigError
    from blade.driver.lowering import with_lowering
    from blade.perf.report import CompileReport

    report = compiled.report
    lowered = report.quantization or {}
    precision = lowered.get("precision") if lowered.get("precision") != "fp32" else None
    low_outputs = any(d in (torch.float16, torch.bfloat16) for d in compiled.graph.output_dtypes())
    config = CompileConfig(backend=compiled.backend, optimize=report.optimize, precision=precision,
                           quantize=lowered.get("quantize"), accuracy_budget=lowered.get("budget"),
                           keep_output_dtype=not (precision and low_outputs),
                           keep_high_precision=frozenset(lowered.get("kept_high_precision", [])))
    if config.quantize == "int8_static":
        raise ConfigError("bisecting an int8_static artifact needs its calibration data: compile it again with "
                          "`blade compile --calibration`, which bisects a compile that misses its tolerance")
    model, example_inputs, dynamic_shapes = source
    captured = capture(model, example_inputs, None, dynamic_shapes, compiled.graph.name)
    pipeline = with_lowering(list(passes), config) if passes is not None else \
        pipelines.pipeline_for(report.optimize, config.lowers_precision)
    args, kwargs = compiled.signature.unflatten_inputs(inputs)
    with torch.no_grad():
        references = captured.reference.flat(captured.graph, args, kwargs)
    judge = Judge(references, tol, compiled.graph.output_dtypes())
    before = judge(compiled.run_flat(inputs))
    found = bisect(captured.graph, pipeline, config, backends.get(compiled.backend), compiled.target, inputs, judge,
                   before.rel_err)
    fixed_report = CompileReport.from_dict(report.as_dict())
    fixed_report.passes = [r.as_dict() for r in found.records]
    fixed_report.bisection = found.as_dict()
    fixed_report.backend = found.backend
    fixed_report.nodes_after = len(found.graph)
    fixed_report.accuracy = judge(found.executable(*inputs))
    fixed = CompiledModel(found.graph, found.executable, found.backend, compiled.target, compiled.signature,
                          fixed_report, list(compiled.example_inputs))
    return found, fixed
