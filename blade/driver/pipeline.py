"""The compile pipeline as named stages: configure, look up the cache, capture, passes, backend, accuracy, report."""
from __future__ import annotations

import time
import warnings
from dataclasses import replace

import torch
import torch.utils._pytree as pytree

from blade import backends
from blade import passes as pipelines
from blade import config as knobs
from blade.config import CompileConfig
from blade.driver import selection as backend_selection
from blade.driver.bisect import bisect
from blade.driver.cache_lookup import CacheLookup
from blade.driver.layer_guard import tolerance_for
from blade.driver.lowering import Lowering, check_lowering_options, with_lowering
from blade.errors import ConfigError
from blade.frontend.capture import bind_example, capture
from blade.frontend.signature import Signature
from blade.ir.fused import calls_within
from blade.ir.graph import dtype_name
from blade.ir.shapes import free_dims
from blade.perf.accuracy import Judge, cast_outputs, exact_outputs
from blade.perf.cost import KINDS
from blade.perf.report import CompileReport
from blade.runtime import cache as compile_cache
from blade.runtime.compiled import CompiledModel
from blade.passes.precision import low_dtype
from blade.target import detect, supports_bf16


class Compilation:
    """One blade.compile call: each stage a method, run in order by `run`, its results kept on self."""

    def __init__(self, model, example_inputs, example_kwargs, dynamic_shapes, *, backend, optimize, passes,
                 check_accuracy, debug, name, cache, precision, quantize, calibration_data, accuracy_budget,
                 autotune, keep_output_dtype):
        self.model, self.example_inputs, self.example_kwargs = model, example_inputs, example_kwargs
        self.dynamic_shapes, self.name, self.passes = dynamic_shapes, name, passes
        self.asked = {"backend": backend, "optimize": optimize, "check_accuracy": check_accuracy,
                      "debug": debug or knobs.debug(), "precision": precision,
                      "quantize": quantize, "calibration_data": calibration_data, "accuracy_budget": accuracy_budget,
                      "keep_output_dtype": keep_output_dtype, "cache": cache, "autotune": autotune}
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.light_fp32 = False  # a lowered-precision compile whose fp32 light graph was the fastest

    def run(self) -> CompiledModel:
        """configure → cache (by source) → capture → cache (by graph) → passes → backend → accuracy → report."""
        self.configure()
        hit = self.lookup_source()
        if hit is not None:
            return hit
        self.capture()
        hit = self.lookup_graph()
        if hit is not None:
            return hit
        self.run_passes()
        self.compile_backend()
        self.check_accuracy()
        return self.finish()

    def configure(self) -> None:
        """The options checked and resolved against this machine: config, pass pipeline, backend, cache key."""
        asked = self.asked
        self.target = detect(_device_of(self.model, self.example_inputs, self.example_kwargs))
        precision, keep_output_dtype, budget = asked["precision"], asked["keep_output_dtype"], asked["accuracy_budget"]
        self.downgraded = precision == "bf16" and not supports_bf16(self.target)
        if self.downgraded:  # never an emulated bf16 slower than fp32
            _warn_once(f"precision='bf16' on {self.target.describe()}, which has no bf16 matmul instructions "
                       "(AVX512-BF16, AMX, Arm BF16, or a CUDA GPU of sm_80 or newer): compiling in fp32")
            precision, keep_output_dtype = "fp32", True  # an fp32 compile has no compute precision to return
            if asked["quantize"] is None:
                budget = None  # nothing is lowered: the fp32 model meets any budget
        self.config = CompileConfig(backend=asked["backend"], optimize=asked["optimize"], debug=asked["debug"],
                                    check_accuracy=asked["check_accuracy"], precision=precision,
                                    quantize=asked["quantize"], accuracy_budget=budget,
                                    keep_output_dtype=keep_output_dtype)
        self.calibration_data = check_lowering_options(self.config, asked["calibration_data"])
        self.pipeline = (with_lowering(list(self.passes), self.config) if self.passes is not None else
                         pipelines.pipeline_for(self.config.optimize, self.config.lowers_precision))
        self.backend, self.reason = backends.resolve(asked["backend"], self.target)
        self.measure = asked["backend"] == "auto" and backend_selection.enabled(asked["autotune"])
        self.cache = CacheLookup(asked["cache"], {
            "backend": "auto (measured)" if self.measure else self.backend.name, "optimize": self.config.optimize,
            "passes": self.passes, "name": self.name, "check_accuracy": self.config.check_accuracy,
            "precision": asked["precision"], "quantize": self.config.quantize, "accuracy_budget": asked["accuracy_budget"],
            "keep_output_dtype": asked["keep_output_dtype"],
            "calibration": compile_cache.tensors_digest(self.calibration_data),
            # process-wide settings that change what capture and the backends produce
            "default_dtype": str(torch.get_default_dtype()),
            "matmul_precision": torch.get_float32_matmul_precision()}, self.target)

    def lookup_source(self) -> CompiledModel | None:
        """A cache hit keyed by the model's code, weights and inputs — before anything is captured."""
        if not self.cache.on:
            return None
        digest, self.cache.why_graph = compile_cache.source_digest(self.model, self.example_inputs,
                                                                   self.example_kwargs, self.dynamic_shapes)
        hit = self.cache.find(digest, self.start)
        if hit is None or not isinstance(self.model, torch.nn.Module):
            return hit  # a .pt2 keeps the example inputs saved with it
        return _with_examples(hit, *bind_example(self.model, self.example_inputs, self.example_kwargs))

    def capture(self) -> None:
        """torch.export → the IR, the call signature and eager's reference outputs."""
        self.captured = capture(self.model, self.example_inputs, self.example_kwargs, self.dynamic_shapes, self.name)
        captured = self.captured
        self.signature = Signature(captured.in_tree, captured.out_tree, captured.arg_names, captured.constants)
        # what an executable takes: the caller's tensors, then the state the compiled model feeds itself
        self.examples = (self.signature.flatten(captured.example_args, captured.example_kwargs)
                         + captured.graph.state_values())

    def lookup_graph(self) -> CompiledModel | None:
        """A cache hit keyed by the captured graph, when the source could not be keyed."""
        if not self.cache.on or self.cache.key is not None:
            return None
        captured = self.captured
        digest = compile_cache.graph_digest(captured.graph, self.signature.as_dict(), captured.example_args,
                                            captured.example_kwargs)
        hit = self.cache.find(digest, self.start)
        return None if hit is None else _with_examples(hit, captured.example_args, captured.example_kwargs)

    def run_passes(self) -> None:
        """The pass pipeline, with quantization and mixed precision when asked."""
        t = time.perf_counter()
        self.lowering = Lowering(self.captured, self.signature, self.pipeline, self.config, self.calibration_data,
                                 self.examples)
        self.graph, self.records = self.lowering.run_passes()
        self.seconds["passes"] = time.perf_counter() - t

    def compile_backend(self) -> None:
        """The graph handed to the chosen backend, or to every candidate, timed, with backend='auto'."""
        t = time.perf_counter()
        config = self.config
        self.judge = Judge(self.captured.reference_outputs, tolerance_for(config), self.graph.output_dtypes(),
                           exact=None if config.lowers_precision else
                           lambda: exact_outputs(self.captured.graph, self.examples), cast=self.cast_referee())
        self.candidates, self.accurate = {}, True
        if self.measure:
            self.select(self.graph)
        else:
            self.executable = self.backend.compile(self.graph, self.target, example_inputs=self.examples)
        self.graph, self.records, self.executable = self.lowering.enforce_budget(
            self.graph, self.records, self.executable, self.backend, self.target)
        self.seconds["backend"] = time.perf_counter() - t

    def cast_referee(self):
        """A precision-only compile without a budget of the user's is held to the precision's default tolerance,
        or, where the model itself cannot hold that in the precision, to the error of the model cast to it: a
        bf16 compile never fails for being as accurate as bf16 is on this model. None otherwise."""
        config = self.config
        dtype = low_dtype(config.precision)
        if dtype is None or config.quantize is not None or self.asked["accuracy_budget"] is not None:
            return None
        return lambda: cast_outputs(self.captured.graph, self.examples, dtype)

    def select(self, graph) -> None:
        """backend='auto', measured: every candidate compiled from `graph` and timed, and the backends that
        optimize a plain graph themselves also from the lightly optimized graph, which becomes the compile's
        graph when it wins."""
        light = self.light_graph()
        chosen = backend_selection.select(graph, self.target, self.examples, self.judge,
                                          light=light[0] if light else None,
                                          label="fp32" if self.config.lowers_precision else "light")
        self.backend, self.executable, self.reason = chosen.backend, chosen.executable, chosen.reason
        self.candidates, self.accurate = chosen.candidates, chosen.accurate
        self.light_fp32 = chosen.light and self.config.lowers_precision
        if chosen.light:
            self.graph, self.records = light

    def light_graph(self):
        """(graph, records) of an alternative a backend with optimizations of its own may run faster, for a
        default compile (no pass list of the user's) of a graph with convolutions (ONNX Runtime's layout and
        Conv fusions): in fp32, the cleanup-only pipeline's graph; with precision='bf16'/'fp16' asked for
        (nothing quantized, fp32 outputs, no budget of the user's), the fp32 pipeline's graph, more accurate
        than asked, which wins only where it is faster than every lowered candidate (depthwise convolutions,
        which bf16 does not speed up on CPU); else None."""
        config, asked = self.config, self.asked
        if self.passes is not None or config.optimize != max(pipelines.PIPELINES) or config.quantize is not None:
            return None
        if config.lowers_precision and (not config.keep_output_dtype or asked["accuracy_budget"] is not None):
            return None
        if not any(KINDS.get(node.target) == "conv" for node in self.captured.graph.call_nodes):
            return None
        if config.lowers_precision:
            return pipelines.run_pipeline(self.captured.graph, pipelines.pipeline_for(config.optimize),
                                          replace(config, precision=None))
        return pipelines.run_pipeline(self.captured.graph, pipelines.PIPELINES[1], config)

    def check_accuracy(self) -> None:
        """Outputs against eager; on a miss, the bisection holds back the rewrites at fault."""
        self.accuracy, self.bisection = None, None
        if not (self.config.check_accuracy or not self.accurate):
            return
        t = time.perf_counter()
        self.accuracy = self.judge(self.executable(*self.examples))
        if not self.accuracy.ok:
            found = bisect(self.captured.graph, *self.lowering.pipeline_and_config(), self.backend, self.target,
                           self.examples, self.judge, self.accuracy.rel_err)
            self.bisection = found
            self.graph, self.records, self.executable = found.graph, found.records, found.executable
            self.backend = backends.get(found.backend)
            self.reason = f"{self.reason}; after the accuracy bisection: {found.outcome}"
            if self.measure and found.outcome == "held back":  # the repaired graph: measure every candidate again
                self.select(self.graph)
                self.reason = f"{self.reason}; after the accuracy bisection held back rewrites"
            self.accuracy = self.judge(self.executable(*self.examples))
        self.seconds["accuracy"] = time.perf_counter() - t

    def finish(self) -> CompiledModel:
        """The compiled model with its report, stored in the cache when it passed."""
        captured, graph = self.captured, self.graph
        report = CompileReport(
            model=graph.name, backend=self.backend.name, backend_reason=self.reason, target=self.target.as_dict(),
            optimize=self.config.optimize,
            dims=[str(r) for r in graph.dims.values() if any(r.name in free_dims(n.val.shape) for n in graph.inputs)],
            specialized=captured.specialized, passes=[r.as_dict() for r in self.records],
            nodes_before=len(captured.graph), nodes_after=len(graph),
            ops_before=captured.graph.count_targets(), ops_after=graph.count_targets(),
            seconds={"capture": captured.seconds, "passes": self.seconds["passes"],
                     "backend": self.seconds["backend"]},
            backend_details=self.executable.describe(),
            backend_candidates=self.candidates, matmul_precision=matmul_precision(graph),
            quantization=self.lowering.summary(graph))
        compiled = CompiledModel(graph, self.executable, self.backend.name, self.target, self.signature, report)
        compiled.example_inputs = compiled.flat_inputs(*captured.example_args, **captured.example_kwargs)
        if self.accuracy is not None:
            report.accuracy = self.accuracy
            report.seconds["accuracy"] = self.seconds["accuracy"]
            explain_accuracy(report, self.bisection)
        if self.light_fp32:
            report.warnings.append(f"precision={self.config.precision!r} asked for, compiled in fp32 on {self.backend.name}: "
                                   "faster here than every lowered candidate (the report's candidates)")
        if self.downgraded:
            report.warnings.append("precision='bf16' asked for, compiled in fp32: this CPU has no bf16 matmul "
                                   "instructions")
        report.seconds["total"] = time.perf_counter() - self.start
        self.cache.store(compiled)
        return compiled


def explain_accuracy(report: CompileReport, bisection) -> None:
    """The report's warnings about accuracy: what the bisection did, what still misses, what the referee passed."""
    if bisection is not None:
        report.bisection = bisection.as_dict()
        report.warnings.append(f"outputs differed from eager beyond tolerance (rel_err {bisection.error_before:.3g}): "
                               f"the accuracy bisection {bisection.outcome_text()}")
    failing = [o for o in report.accuracy.outputs if not o.ok]
    if failing:
        report.warnings.append("outputs differ from eager beyond tolerance: " + ", ".join(
            f"output {o.index} rel_err {o.rel_err:.3g} > {o.tolerance:g}" for o in failing))
    cast = [o for o in report.accuracy.refereed if o.cast_rel_err is not None]
    if cast:
        report.warnings.append("the precision cannot hold the tolerance on this model: " + ", ".join(
            f"output {o.index} is {o.rel_err:.3g} from fp32 eager, where the model cast to the precision is "
            f"{o.cast_rel_err:.3g}" for o in cast) + "; accepted as no less accurate than the cast model")
    refereed = [o for o in report.accuracy.refereed if o.cast_rel_err is None]
    if refereed:
        report.warnings.append("fp32 cannot hold the tolerance on this model (it amplifies rounding): " + ", ".join(
            f"output {o.index} is {o.rel_err:.3g} from eager, {o.exact_rel_err:.3g} from the float64 answer, where "
            f"eager's own fp32 output is {o.eager_exact_rel_err:.3g}" for o in refereed)
            + "; accepted as no less accurate than eager")


def matmul_precision(graph) -> dict[str, str]:
    """Every matmul, convolution and attention node (inside fused regions too) -> what it computes in."""
    found = {}
    for node in calls_within(graph):
        if KINDS.get(node.target) not in ("matmul", "conv", "attention"):
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
        warnings.warn(f"blade: {message}", stacklevel=5)


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
