"""The accuracy guard: measure each quantized/low-precision layer's effect, keep the worst ones in fp32.

The error of a candidate graph is the worst relative error ‖out − ref‖/‖ref‖ over its floating
outputs and over every check sample (the example inputs and the calibration inputs), against the
fp32 graph, measured by running the graph eagerly (the reference semantics of blade's ops). A
layer's sensitivity is that error with only this layer lowered. To meet a budget the guard keeps
the k most sensitive layers in fp32, the smallest k that holds (binary search: the error falls as k
grows), at most all but one: a budget that only an unquantized model meets raises AccuracyError
rather than silently giving back the fp32 model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from blade.perf.accuracy import compare
from blade.config import CompileConfig
from blade.errors import AccuracyError
from blade.ir.fused import calls_within
from blade.ir.graph import Graph
from blade.passes import PassRecord, run_pipeline
from blade.passes.quantize import KEPT_AS

# default tolerance of the compile-time accuracy check, per mode, when no budget is given
DEFAULT_TOLERANCE = {"fp16": 1e-2, "bf16": 1e-2, "int8_weight_only": 2e-2, "int8_dynamic": 5e-2,
                     "int8_static": 1e-1, "fp8": 1e-1, "int4_weight_only": 1.5e-1}


def tolerance_for(config: CompileConfig) -> float | None:
    """The relative error a compile with these options is held to (None: the dtype's own tolerance)."""
    if config.accuracy_budget is not None:
        return config.accuracy_budget
    tolerances = [DEFAULT_TOLERANCE[m] for m in (config.quantize, config.precision) if m in DEFAULT_TOLERANCE]
    return max(tolerances) if tolerances else None


def kept_as(config: CompileConfig) -> str:
    """What a layer the guard keeps computes in: fp32, or the next rung of the quantize mode (int4 -> int8)."""
    return KEPT_AS.get(config.quantize, "fp32").replace("_", " ")


def tolerance_of(summary: dict) -> float | None:
    """The tolerance a compiled model was held to, from its report's quantization summary."""
    if not summary:
        return None
    return tolerance_for(CompileConfig(precision=summary.get("precision"), quantize=summary.get("quantize"),
                                       accuracy_budget=summary.get("budget")))


def lowered_layers(graph: Graph) -> list[str]:
    """Names of the layers the quantize/precision passes rewrote (inside fused regions too), in order."""
    return list(dict.fromkeys(n.meta["layer"] for n in calls_within(graph) if n.meta.get("layer")))


def graph_error(graph: Graph, samples: list[list], references: list[list]) -> float:
    """Worst relative error of the graph's outputs over the samples (NaN counts as infinite)."""
    module = graph.to_fx()
    declared = graph.output_dtypes()
    worst = 0.0
    with torch.no_grad():
        for sample, reference in zip(samples, references):
            outputs = list(module(*sample))
            floating = [(o, r, d) for o, r, d in zip(outputs, reference, declared)
                        if isinstance(r, torch.Tensor) and r.is_floating_point()]
            if not floating:
                continue
            outs, refs, dtypes = map(list, zip(*floating))
            rel = compare(outs, refs, declared=dtypes).rel_err
            worst = max(worst, math.inf if math.isnan(rel) else rel)
    return worst


@dataclass
class GuardResult:
    """What the guard measured and decided."""

    budget: float
    error_all_lowered: float
    error: float
    sensitivity: dict[str, float] = field(default_factory=dict)  # layer -> error with it alone lowered
    kept: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"budget": self.budget, "error_all_lowered": self.error_all_lowered, "error_eager": self.error,
                "kept_high_precision": list(self.kept),
                "layers": [{"name": k, "error_alone": v, "kept": k in self.kept} for k, v in self.sensitivity.items()]}


class Guard:
    """Runs the lowering passes with different kept sets on a graph already through the earlier passes."""

    def __init__(self, graph: Graph, lowering: list, config: CompileConfig, samples: list[list],
                 references: list[list]):
        self.graph, self.lowering, self.config = graph, lowering, config
        self.samples, self.references = samples, references
        self.layers = lowered_layers(self.lowered(())[0])

    def lowered(self, keep) -> tuple[Graph, list[PassRecord]]:
        return run_pipeline(self.graph, self.lowering, replace(self.config, keep_high_precision=frozenset(keep)))

    def error(self, keep) -> float:
        return graph_error(self.lowered(keep)[0], self.samples, self.references)

    def choose(self, budget: float) -> GuardResult:
        """The fewest most-sensitive layers to keep (in fp32, or int4's next rung) so that the eager error is within
        budget."""
        all_lowered = self.error(())
        sensitivity = {name: self.error([n for n in self.layers if n != name]) for name in self.layers}
        ranked = sorted(self.layers, key=lambda n: -sensitivity[n])
        result = GuardResult(budget, all_lowered, all_lowered, sensitivity)
        if all_lowered <= budget:
            return result
        most = len(ranked) - 1
        floor = self.error(ranked[:most]) if most else all_lowered
        if floor > budget:
            result.kept = ranked[:most]
            raise self.failure(result, floor)
        low, high, high_error = 0, most, floor  # error(low) > budget >= error(high)
        while high - low > 1:
            mid = (low + high) // 2
            err = self.error(ranked[:mid])
            if err <= budget:
                high, high_error = mid, err
            else:
                low = mid
        result.kept, result.error = ranked[:high], high_error
        return result

    def more_kept(self, result: GuardResult) -> list[str] | None:
        """The next larger kept set (twice as many, at least one more, at most all but one), or None."""
        ranked = sorted(self.layers, key=lambda n: -result.sensitivity.get(n, 0.0))
        most = len(ranked) - 1
        if len(result.kept) >= most:
            return None
        return ranked[:min(most, max(len(result.kept) + 1, 2 * len(result.kept)))]

    def failure(self, result: GuardResult, floor: float, measured_on: str = "eager") -> AccuracyError:
        worst = sorted(result.sensitivity.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{name} {err:.3g}" for name, err in worst[:10]) + (" …" if len(worst) > 10 else "")
        what = "; ".join(f"{k}={v!r}" for k, v in (("quantize", self.config.quantize),
                                                     ("precision", self.config.precision)) if v)
        return AccuracyError(
            f"{what} cannot meet accuracy_budget={result.budget:g}: the relative error vs fp32 is "
            f"{result.error_all_lowered:.3g} with all {len(self.layers)} layers lowered and still {floor:.3g} "
            f"({measured_on}) with {len(result.kept)} kept in {kept_as(self.config)} (at most all but one is kept: "
            f"a model with nothing lowered is not what was asked for). Error with one layer alone lowered: "
            f"{shown}. Raise the budget, choose a milder mode, or calibrate on more representative data.",
            layers=dict(worst))
