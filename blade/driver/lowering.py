"""Quantization and mixed precision within a compile: the options checked, the passes run, the budget held."""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.utils._pytree as pytree

from blade.perf.accuracy import compare
from blade.config import CompileConfig
from blade.errors import ConfigError, InputError
from blade.ir.fused import calls_within
from blade.driver.layer_guard import Guard, GuardResult, lowered_layers
from blade.runtime.guards import check_inputs
from blade.passes import precision, quantize, run_pipeline

LOWERING_PASSES = (quantize.run, precision.run)
MAX_BACKEND_RETRIES = 3


def check_lowering_options(config: CompileConfig, calibration_data) -> list | None:
    """Refuse bad precision/quantize/budget/calibration options before any work; the calibration as a list."""
    precision.low_dtype(config.precision)
    if config.quantize is not None and config.quantize not in quantize.QUANTIZE_MODES:
        raise ConfigError(f"quantize={config.quantize!r} is not a mode; choose one of {list(quantize.QUANTIZE_MODES)} "
                          "or None")
    budget = config.accuracy_budget
    if budget is not None and not (isinstance(budget, (int, float)) and budget > 0 and math.isfinite(budget)):
        raise ConfigError(f"accuracy_budget={budget!r} must be a positive relative error, e.g. 0.01")
    if budget is not None and not config.lowers_precision:
        raise ConfigError("accuracy_budget applies to quantize= or precision='fp16'/'bf16'; without them the model "
                          "is compiled in fp32 and checked against its own tolerance")
    if not config.keep_output_dtype and precision.low_dtype(config.precision) is None:
        raise ConfigError("keep_output_dtype=False returns outputs in the compute precision, which only "
                          "precision='fp16' or 'bf16' lowers; add one of them or drop keep_output_dtype")
    if calibration_data is None:
        if config.quantize == "int8_static":
            raise ConfigError("quantize='int8_static' needs calibration_data: an iterable of example inputs (each a "
                              "tuple of arguments, a dict of keyword arguments or one tensor) like the model will see")
        return None
    if isinstance(calibration_data, (torch.Tensor, dict)):
        raise ConfigError("calibration_data must be an iterable of samples (a list of input tuples), not one sample")
    samples = list(calibration_data)
    if not samples:
        raise ConfigError("calibration_data is empty; give at least one sample")
    return samples


def with_lowering(passes: list, config: CompileConfig) -> list:
    """A user's pipeline, with the lowering passes added when asked for and absent: before fusion when
    the list has it (a linear inside a fused region is no longer lowered), else at the end."""
    from blade.passes import before_fusion

    if config.lowers_precision:
        missing = [p for p in LOWERING_PASSES if p not in passes]
        at = before_fusion(passes)
        passes[at:at] = missing
    return passes


def _bind(sample, index: int) -> tuple[tuple, dict]:
    if isinstance(sample, torch.Tensor):
        return (sample,), {}
    if isinstance(sample, dict):
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    raise InputError(f"calibration_data[{index}] is a {type(sample).__name__}; each sample must be a tuple of "
                     "arguments, a dict of keyword arguments or one tensor")


class Lowering:
    """One compile's quantization/precision: the check samples, the passes, the guard and what it decided."""

    def __init__(self, captured, signature, pipeline: list, config: CompileConfig, calibration, examples: list):
        self.captured, self.pipeline, self.config = captured, pipeline, config
        self.samples, self.references = [examples], [captured.reference_outputs]
        for i, sample in enumerate(calibration or []):
            args, kwargs = _bind(sample, i)
            try:
                flat = signature.flatten(args, kwargs)
                check_inputs(captured.graph.inputs, captured.graph.dims, flat)
            except Exception as exc:  # noqa: BLE001 - name the sample whatever was wrong with it
                raise InputError(f"calibration_data[{i}] does not fit the model's inputs: {exc}") from exc
            self.samples.append([t.contiguous() for t in flat] + captured.graph.state_values())
            self.references.append(captured.reference.flat(captured.graph, args, kwargs))
        self.config = replace(config, calibration=tuple(self.samples[1:]))
        self.guard: Guard | None = None
        self.result: GuardResult | None = None
        self.backend_errors: list[float] = []

    @property
    def guarded(self) -> bool:
        return self.config.lowers_precision and self.config.accuracy_budget is not None

    def run_passes(self, keep=()):
        """(graph, records) through the whole pipeline; with a budget, the guard chooses what stays fp32."""
        if not self.guarded:
            return run_pipeline(self.captured.graph, self.pipeline, self.config)
        first = min(self.pipeline.index(p) for p in LOWERING_PASSES if p in self.pipeline)
        prefix, rest = self.pipeline[:first], self.pipeline[first:]
        if self.guard is None:
            before, self.prefix_records = run_pipeline(self.captured.graph, prefix, self.config)
            lowering = [p for p in rest if p in LOWERING_PASSES]
            self.guard = Guard(before, lowering, self.config, self.samples, self.references)
            self.result = self.guard.choose(self.config.accuracy_budget)
            keep = self.result.kept
        graph, records = run_pipeline(self.guard.graph, rest, replace(self.config, keep_high_precision=frozenset(keep)))
        return graph, self.prefix_records + records

    def pipeline_and_config(self) -> tuple[list, CompileConfig]:
        """The pipeline as the compile ran it and the config that reproduces it (with the layers the guard kept in
        fp32), for the accuracy bisection to run again with rewrites held back."""
        kept = frozenset(self.result.kept) if self.result is not None else self.config.keep_high_precision
        return self.pipeline, replace(self.config, keep_high_precision=kept)

    def enforce_budget(self, graph, records, executable, backend, target):
        """Check the backend's own outputs against the budget; keep more layers in fp32 and recompile while
        they miss it (the backend's numerics can differ from the eager reference), else AccuracyError."""
        if not self.guarded:
            return graph, records, executable
        budget = self.config.accuracy_budget
        for attempt in range(MAX_BACKEND_RETRIES + 1):
            error = self._backend_error(executable, graph.output_dtypes())
            self.backend_errors.append(error)
            if error <= budget:
                return graph, records, executable
            more = self.guard.more_kept(self.result) if attempt < MAX_BACKEND_RETRIES else None
            if more is None:
                raise self.guard.failure(self.result, error, f"on the {backend.name} backend")
            self.result.kept = more
            self.result.error = self.guard.error(more)
            graph, records = self.run_passes(more)
            examples = self.samples[0]
            executable = backend.compile(graph, target, example_inputs=examples)
        raise AssertionError("unreachable")

    def _backend_error(self, executable, declared: list) -> float:
        worst = 0.0
        for sample, reference in zip(self.samples, self.references):
            triples = [(o, r, d) for o, r, d in zip(executable(*sample), reference, declared)
                       if isinstance(r, torch.Tensor) and r.is_floating_point()]
            if triples:
                outs, refs, dtypes = map(list, zip(*triples))
                rel = compare(outs, refs, declared=dtypes).rel_err
                worst = max(worst, math.inf if math.isnan(rel) else rel)
        return worst

    def summary(self, graph) -> dict:
        """What the report shows: modes, every lowered layer, what stayed fp32 and the errors measured."""
        if not self.config.lowers_precision:
            return {}
        layers = [{"layer": n.meta["layer"], "source": n.meta.get("source"),
                   "as": n.meta.get("quantized") or n.meta.get("precision")}
                  for n in calls_within(graph) if n.meta.get("layer")]
        data = {"precision": self.config.precision or "fp32", "quantize": self.config.quantize,
                "calibration_samples": len(self.config.calibration) if self.config.quantize == "int8_static" else 0,
                "check_samples": len(self.samples), "lowered": layers}
        if self.result is not None:
            data.update(self.result.as_dict())
            data["error_backend"] = self.backend_errors[-1] if self.backend_errors else None
        return data


__all__ = ["Lowering", "check_lowering_options", "lowered_layers", "with_lowering"]
