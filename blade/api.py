"""blade.compile: capture → passes → backend → CompiledModel, with the report of every step."""
from __future__ import annotations

import os
import time

import torch
import torch.utils._pytree as pytree

from blade import backends
from blade import passes as pipelines
from blade.accuracy import compare
from blade.capture import capture
from blade.compiled import CompiledModel
from blade.config import DEFAULT_OPTIMIZE, CompileConfig
from blade.errors import ConfigError
from blade.report import CompileReport
from blade.shapes import free_dims
from blade.signature import Signature
from blade.target import detect


def compile(model, example_inputs=(), *, example_kwargs=None, dynamic_shapes=None, backend: str = "auto",
            optimize: int = DEFAULT_OPTIMIZE, passes=None, check_accuracy: bool = True,
            debug: bool = False, name: str | None = None) -> CompiledModel:
    """Compile `model` (nn.Module, ExportedProgram or .pt2 path) for inference.

    `dynamic_shapes` follows torch.export's convention; `backend` is a registered name or "auto";
    `optimize` picks the pass pipeline (0 none, 1 cleanup, 2 all); `passes` (a list) replaces it.
    """
    debug = debug or os.environ.get("BLADE_DEBUG") == "1"  # the test suite verifies the IR after every pass
    config = CompileConfig(backend=backend, optimize=optimize, debug=debug, check_accuracy=check_accuracy)
    pipeline = list(passes) if passes is not None else pipelines.pipeline_for(optimize)
    start = time.perf_counter()
    target = detect(_device_of(model, example_inputs, example_kwargs))
    chosen, reason = backends.resolve(backend, target)

    captured = capture(model, example_inputs, example_kwargs, dynamic_shapes, name)
    t_passes = time.perf_counter()
    graph, records = pipelines.run_pipeline(captured.graph, pipeline, config)
    t_backend = time.perf_counter()
    signature = Signature(captured.in_tree, captured.out_tree, captured.arg_names)
    examples = signature.flatten(captured.example_args, captured.example_kwargs)
    executable = chosen.compile(graph, target, example_inputs=examples)
    t_done = time.perf_counter()

    report = CompileReport(
        model=graph.name, backend=chosen.name, backend_reason=reason, target=target.as_dict(), optimize=optimize,
        dims=[str(r) for r in graph.dims.values() if any(r.name in free_dims(n.val.shape) for n in graph.inputs)],
        specialized=captured.specialized, passes=[r.as_dict() for r in records],
        nodes_before=len(captured.graph), nodes_after=len(graph),
        ops_before=captured.graph.count_targets(), ops_after=graph.count_targets(),
        seconds={"capture": captured.seconds, "passes": t_backend - t_passes, "backend": t_done - t_backend},
        backend_details=executable.describe() if hasattr(executable, "describe") else {})
    compiled = CompiledModel(graph, executable, chosen.name, target, signature, report)
    compiled.example_inputs = compiled.flat_inputs(*captured.example_args, **captured.example_kwargs)
    if check_accuracy:
        t_check = time.perf_counter()
        outputs = compiled.run_flat(compiled.example_inputs)
        report.accuracy = compare(outputs, captured.reference_outputs)
        report.seconds["accuracy"] = time.perf_counter() - t_check
        if not report.accuracy.ok:
            report.warnings.append(f"outputs differ from eager beyond tolerance (rel_err {report.accuracy.rel_err:.3g})")
    report.seconds["total"] = time.perf_counter() - start
    return compiled


def _device_of(model, example_inputs, example_kwargs) -> str:
    """'cuda' when the example inputs (or the module's weights) live on a GPU, else 'cpu'."""
    tensors = [t for t in pytree.tree_leaves((example_inputs, example_kwargs)) if isinstance(t, torch.Tensor)]
    if isinstance(model, torch.nn.Module):
        tensors += list(model.parameters())[:1]
    kinds = {t.device.type for t in tensors}
    if len(kinds) > 1:
        raise ConfigError(f"inputs and weights are spread over devices {sorted(kinds)}; move them to one device")
    return kinds.pop() if kinds else "cpu"
