"""blade.compile: capture → passes → backend → CompiledModel, with the report of every step."""
from __future__ import annotations

import os
import time
import warnings

import torch
import torch.utils._pytree as pytree

from blade import backends
from blade.driver import selection as backend_selection
from blade import passes as pipelines
from blade.perf.accuracy import Judge, exact_outputs
from blade.driver.bisect import bisect
from blade.runtime import cache as compile_cache
from blade.frontend.capture import bind_example, capture
from blade.runtime.compiled import CompiledModel
from blade.config import DEFAULT_OPTIMIZE, CompileConfig
from blade.errors import ConfigError
from blade.runtime.fingerprint import Unstable
from blade.driver.layer_guard import tolerance_for
from blade.driver.lowering import Lowering, check_lowering_options, with_lowering
from blade.perf.report import CompileReport
from blade.ir.shapes import free_dims
from blade.frontend.signature import Signature
from blade.target import detect


def compile(model, example_inputs=(), *, example_kwargs=None, dynamic_shapes=None, backend: str = "auto",
            optimize: int = DEFAULT_OPTIMIZE, passes=None, check_accuracy: bool = True,
            debug: bool = False, name: str | None = None, cache: bool | None = None,
            precision: str | None = None, quantize: str | None = None, calibration_data=None,
            accuracy_budget: float | None = None, autotune: bool | None = None,
            keep_output_dtype: bool = True) -> CompiledModel:
    """Compile `model` (nn.Module, ExportedProgram or .pt2 path) for inference.

    `dynamic_shapes` follows torch.export's convention; `backend` is a registered name or "auto";
    `optimize` picks the pass pipeline (0 none, 1 cleanup, 2 all); `passes` (a list) replaces it.
    `cache` (default $BLADE_CACHE, on) reuses an equal earlier compile from the on-disk cache.
    `precision` ("fp32", "fp16", "bf16") is what matmuls, convolutions and attention compute in;
    `quantize` ("int8_weight_only", "int8_dynamic", "int8_static", "fp8") quantizes linear layers and
    embedding tables; `calibration_data` (an iterable of example inputs, each a tuple of arguments, a
    dict of keyword arguments or one tensor) calibrates int8_static and joins the accuracy check;
    `accuracy_budget` (max relative error vs fp32) keeps the most sensitive layers in fp32 until it
    holds, or raises blade.errors.AccuracyError. With backend="auto" and `autotune` (default
    $BLADE_AUTOTUNE, on) the backends that can run the graph are compiled and timed on the example
    inputs and the fastest is kept (the report lists every candidate's time); autotune=False follows
    the fixed rule (Triton on a CUDA GPU, else ONNX Runtime). `keep_output_dtype=False` (with precision
    "fp16"/"bf16") returns floating outputs in that precision, as `model.to(dtype)` would, instead of the
    model's fp32: no cast back, half the output bytes.
    """
    debug = debug or os.environ.get("BLADE_DEBUG") == "1"  # the test suite verifies the IR after every pass
    start = time.perf_counter()
    target = detect(_device_of(model, example_inputs, example_kwargs))
    asked_precision = precision
    downgraded = precision == "bf16" and not supports_bf16(target)
    if downgraded:  # never an emulated bf16 slower than fp32
        _warn_once(f"precision='bf16' on {target.describe()}, which has no bf16 matmul instructions (AVX512-BF16, "
                   "AMX, Arm BF16, or a CUDA GPU of sm_80 or newer): compiling in fp32")
        precision = "fp32"
        keep_output_dtype = True  # an fp32 compile has no compute precision to return
        if quantize is None:
            accuracy_budget = None  # nothing is lowered: the fp32 model meets any budget
    config = CompileConfig(backend=backend, optimize=optimize, debug=debug, check_accuracy=check_accuracy,
                           precision=precision, quantize=quantize, accuracy_budget=accuracy_budget,
                           keep_output_dtype=keep_output_dtype)
    calibration_data = check_lowering_options(config, calibration_data)
    pipeline = with_lowering(list(passes), config) if passes is not None else \
        pipelines.pipeline_for(optimize, config.lowers_precision)
    chosen, reason = backends.resolve(backend, target)
    measure = backend == "auto" and backend_selection.enabled(autotune)
    lookup = _CacheLookup(cache, {"backend": "auto (measured)" if measure else chosen.name, "optimize": optimize,
                                  "passes": passes, "name": name,
                                  "check_accuracy": check_accuracy, "precision": asked_precision, "quantize": quantize,
                                  "accuracy_budget": accuracy_budget, "keep_output_dtype": keep_output_dtype,
                                  "calibration": compile_cache.tensors_digest(calibration_data),
                                  # process-wide settings that change what capture and the backends produce
                                  "default_dtype": str(torch.get_default_dtype()),
                                  "matmul_precision": torch.get_float32_matmul_precision()}, target)
    if lookup.on:
        digest, lookup.why_graph = compile_cache.source_digest(model, example_inputs, example_kwargs, dynamic_shapes)
        hit = lookup.find(digest, start)
        if hit is not None:
            if isinstance(model, torch.nn.Module):
                return _with_examples(hit, *bind_example(model, example_inputs, example_kwargs))
            return hit  # a .pt2 keeps the example inputs saved with it

    captured = capture(model, example_inputs, example_kwargs, dynamic_shapes, name)
    signature = Signature(captured.in_tree, captured.out_tree, captured.arg_names, captured.constants)
    if lookup.on and lookup.key is None:
        digest = compile_cache.graph_digest(captured.graph, signature.as_dict(), captured.example_args,
                                            captured.example_kwargs)
        hit = lookup.find(digest, start)
        if hit is not None:
            return _with_examples(hit, captured.example_args, captured.example_kwargs)
    t_passes = time.perf_counter()
    # what an executable takes: the caller's tensors, then the state the compiled model feeds itself
    examples = signature.flatten(captured.example_args, captured.example_kwargs) + captured.graph.state_values()
    lowering = Lowering(captured, signature, pipeline, config, calibration_data, examples)
    graph, records = lowering.run_passes()
    t_backend = time.perf_counter()
    judge = Judge(captured.reference_outputs, tolerance_for(config), graph.output_dtypes(),
                  exact=None if config.lowers_precision else lambda: exact_outputs(captured.graph, examples))
    candidates, accurate = {}, True
    if measure:
        selection = backend_selection.select(graph, target, examples, judge)
        chosen, executable, reason, candidates, accurate = (selection.backend, selection.executable, selection.reason,
                                                            selection.candidates, selection.accurate)
    else:
        executable = chosen.compile(graph, target, example_inputs=examples)
    graph, records, executable = lowering.enforce_budget(graph, records, executable, chosen, target)
    t_done = time.perf_counter()
    accuracy, bisection = None, None
    if check_accuracy or not accurate:
        t_check = time.perf_counter()
        accuracy = judge(executable(*examples))
        if not accuracy.ok:
            bisection = bisect(captured.graph, *lowering.pipeline_and_config(), chosen, target, examples, judge,
                               accuracy.rel_err)
            graph, records, executable = bisection.graph, bisection.records, bisection.executable
            chosen = backends.get(bisection.backend)
            reason = f"{reason}; after the accuracy bisection: {bisection.outcome}"
            if measure and bisection.outcome == "held back":  # the repaired graph: measure every candidate again
                selection = backend_selection.select(graph, target, examples, judge)
                chosen, executable, candidates = selection.backend, selection.executable, selection.candidates
                reason = f"{selection.reason}; after the accuracy bisection held back rewrites"
            accuracy = judge(executable(*examples))
        t_check = time.perf_counter() - t_check

    report = CompileReport(
        model=graph.name, backend=chosen.name, backend_reason=reason, target=target.as_dict(), optimize=optimize,
        dims=[str(r) for r in graph.dims.values() if any(r.name in free_dims(n.val.shape) for n in graph.inputs)],
        specialized=captured.specialized, passes=[r.as_dict() for r in records],
        nodes_before=len(captured.graph), nodes_after=len(graph),
        ops_before=captured.graph.count_targets(), ops_after=graph.count_targets(),
        seconds={"capture": captured.seconds, "passes": t_backend - t_passes, "backend": t_done - t_backend},
        backend_details=executable.describe() if hasattr(executable, "describe") else {},
        backend_candidates=candidates, matmul_precision=matmul_precision(graph),
        quantization=lowering.summary(graph))
    compiled = CompiledModel(graph, executable, chosen.name, target, signature, report)
    compiled.example_inputs = compiled.flat_inputs(*captured.example_args, **captured.example_kwargs)
    if accuracy is not None:
        report.accuracy = accuracy
        report.seconds["accuracy"] = t_check
        _explain_accuracy(report, bisection)
    if downgraded:
        report.warnings.append("precision='bf16' asked for, compiled in fp32: this CPU has no bf16 matmul instructions")
    report.seconds["total"] = time.perf_counter() - start
    lookup.store(compiled)
    return compiled


def _explain_accuracy(report: CompileReport, bisection) -> None:
    """The report's warnings about accuracy: what the bisection did, what still misses, what the referee passed."""
    if bisection is not None:
        report.bisection = bisection.as_dict()
        report.warnings.append(f"outputs differed from eager beyond tolerance (rel_err {bisection.error_before:.3g}): "
                               f"the accuracy bisection {bisection.outcome_text()}")
    failing = [o for o in report.accuracy.outputs if not o.ok]
    if failing:
        report.warnings.append("outputs differ from eager beyond tolerance: " + ", ".join(
            f"output {o.index} rel_err {o.rel_err:.3g} > {o.tolerance:g}" for o in failing))
    refereed = report.accuracy.refereed
    if refereed:
        report.warnings.append("fp32 cannot hold the tolerance on this model (it amplifies rounding): " + ", ".join(
            f"output {o.index} is {o.rel_err:.3g} from eager, {o.exact_rel_err:.3g} from the float64 answer, where "
            f"eager's own fp32 output is {o.eager_exact_rel_err:.3g}" for o in refereed)
            + "; accepted as no less accurate than eager")


class _CacheLookup:
    """One compile's use of the cache: its key, a hit, or what storing the result did."""

    def __init__(self, asked: bool | None, options: dict, target):
        self.on, self.key, self.why_graph, self.why_off = compile_cache.enabled(asked), None, "", ""
        self.problem = ""  # why an existing entry could not be used
        self.target = target.as_dict()
        try:
            self.options = compile_cache.options_digest(options)
        except Unstable as exc:
            self.why_off = f"not cached: custom passes cannot be keyed ({exc})" if self.on else ""
            self.on = False

    def find(self, digest: str | None, start: float):
        """The cached model for `digest` (with the report saying so), else None; remembers the key."""
        if digest is None:
            return None
        t_key = time.perf_counter()
        self.key = compile_cache.make_key(digest, "", self.options, self.target)
        hit, self.problem = compile_cache.load(self.key)
        if hit is None:
            return None
        done = time.perf_counter()
        report = hit.report
        report.cache = {"hit": True, "key": self.key, "path": str(compile_cache.directory() / self.key),
                        "compiled_seconds": report.seconds}
        report.seconds = {"cache_key": t_key - start, "cache_load": done - t_key, "total": done - start}
        return hit

    def store(self, compiled: CompiledModel) -> None:
        """Cache a compile that passed its accuracy check; the report says what happened."""
        report = compiled.report
        if not self.on or self.key is None:
            if self.why_off or self.on:
                report.cache = {"hit": False, "key": None, "stored": self.why_off or "not cached: the graph has no "
                                "saved form to key it by"}
            return
        if report.accuracy is not None and not report.accuracy.ok:
            report.cache = {"hit": False, "key": self.key, "stored": "not cached: outputs differ from eager"}
            return
        t_store = time.perf_counter()
        try:
            path, what = compile_cache.store(compiled, self.key)
        except Exception as exc:  # noqa: BLE001 - a full or read-only disk costs the cache, never the compile
            path, what = None, f"not cached: {type(exc).__name__}: {exc}"
            report.warnings.append(f"compile cache: {what}")
        if self.problem:
            report.warnings.append(f"compile cache: {self.problem}")
        report.cache = {"hit": False, "key": self.key, "path": str(path) if path else None, "stored": what,
                        "keyed_by": f"captured graph ({self.why_graph})" if self.why_graph else "source"}
        report.seconds["cache_store"] = time.perf_counter() - t_store


def matmul_precision(graph) -> dict[str, str]:
    """Every matmul, convolution and attention node (inside fused regions too) -> what it computes in."""
    from blade.perf.cost import ATTENTIONS, CONVOLUTIONS, MATMULS
    from blade.ir.fused import calls_within
    from blade.ir.graph import dtype_name

    found = {}
    for node in calls_within(graph):
        if node.target not in MATMULS and node.target not in CONVOLUTIONS and node.target not in ATTENTIONS:
            continue
        mode = node.meta.get("quantized")
        tensor = next((r for r in node.refs() if hasattr(r.val, "dtype")), None)
        found[node.meta.get("layer") or node.name] = (
            "fp8" if mode == "fp8" else f"int8 {mode}" if mode else
            dtype_name(tensor.val.dtype) if tensor is not None else "?")
    return found


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(f"blade: {message}", stacklevel=3)


def supports_bf16(target) -> bool:
    """Whether bf16 matmuls run natively: a CPU with AVX512-BF16, AMX or Arm's BF16, a CUDA GPU of sm_80+."""
    if target.device == "cuda":
        digits = "".join(c for c in target.arch.removeprefix("sm_") if c.isdigit())
        return not digits or int(digits[:-1] or 0) >= 8
    return bool(set(target.features) & {"avx512_bf16", "amx_bf16", "bf16", "svebf16"})


def _with_examples(compiled: CompiledModel, args: tuple, kwargs: dict) -> CompiledModel:
    """A cache hit keeps this call's example inputs (saved with the model, used by profile)."""
    compiled.example_inputs = compiled.flat_inputs(*args, **kwargs)
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
