"""Accuracy of outputs against a reference: relative error, max abs error, cosine — NaN never passes."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

# Relative-error tolerance per output dtype (DESIGN.md, Measuring).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# A floating output that misses its tolerance against eager still passes when it is no further from the exact
# (float64) answer than this many times eager's own outputs are: the model amplifies rounding so much that eager
# itself misses the tolerance (or, in a bf16 model, computes in bf16 what it returns in fp32), and a reordered
# computation rounds differently by as much (see Judge).
REFEREE_FACTOR = 2.0


@dataclass
class OutputError:
    index: int
    dtype: str
    max_abs: float
    rel_err: float
    cosine: float
    tolerance: float
    exact_rel_err: float | None = None  # against the float64 answer, when the referee was asked
    eager_exact_rel_err: float | None = None  # eager's own fp32 output against the float64 answer
    cast_rel_err: float | None = None  # a low-precision compile: the model cast to that dtype, against eager

    @property
    def ok(self) -> bool:
        if self.rel_err <= self.tolerance:  # False for NaN
            return True
        if self.cast_rel_err is not None:  # as accurate as the precision is on this model
            return self.rel_err <= self.cast_rel_err
        return self.exact_rel_err is not None and self.eager_exact_rel_err is not None and \
            self.exact_rel_err <= max(self.tolerance, REFEREE_FACTOR * self.eager_exact_rel_err)

    @property
    def refereed(self) -> bool:
        """Passed only by a referee: the float64 answer (eager's own rounding misses the tolerance) or, in a
        low-precision compile, the model cast to that precision (which misses it too)."""
        return self.ok and not self.rel_err <= self.tolerance


@dataclass
class Accuracy:
    """The worst figures over all outputs, and each output's own."""

    outputs: list[OutputError] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return _worst(o.max_abs for o in self.outputs)

    @property
    def rel_err(self) -> float:
        return _worst(o.rel_err for o in self.outputs)

    @property
    def cosine(self) -> float:
        values = [o.cosine for o in self.outputs]
        return min(values, key=lambda v: -math.inf if math.isnan(v) else v) if values else 1.0

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def as_dict(self) -> dict:
        return {"max_abs": self.max_abs, "rel_err": self.rel_err, "cosine": self.cosine, "ok": self.ok,
                "outputs": [{k: v for k, v in asdict(o).items() if v is not None} for o in self.outputs]}

    @property
    def refereed(self) -> list[OutputError]:
        return [o for o in self.outputs if o.refereed]

    @classmethod
    def from_dict(cls, data: dict) -> "Accuracy":
        numeric = ("max_abs", "rel_err", "cosine", "tolerance", "exact_rel_err", "eager_exact_rel_err", "cast_rel_err")
        fields = OutputError.__dataclass_fields__
        return cls([OutputError(**{k: float(v) if k in numeric and v is not None else v for k, v in o.items()
                                   if k in fields}) for o in data.get("outputs", [])])


def _worst(values) -> float:
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values, default=0.0)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 over the finite entries (‖out − ref‖ when ref is all zeros).

    NaN anywhere gives NaN (never passes); ±inf must stand in the same places with the same sign.
    """
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(out64).any() or torch.isnan(ref64).any():
        return math.nan
    infinite = torch.isinf(ref64)
    if not torch.equal(infinite, torch.isinf(out64)) or not torch.equal(out64[infinite], ref64[infinite]):
        return math.inf
    out64, ref64 = out64[~infinite], ref64[~infinite]
    diff = torch.linalg.vector_norm(out64 - ref64).item()
    norm = torch.linalg.vector_norm(ref64).item()
    return diff / norm if norm > 0 else diff


def _lowered(dtype: torch.dtype, reference: torch.dtype, declared) -> bool:
    """An fp16/bf16 output of an fp32 value that the compiled graph declares so (keep_output_dtype=False):
    compared by value, in float64. Any other dtype change is a failure."""
    return reference == torch.float32 and dtype == declared and declared in (torch.float16, torch.bfloat16)


def compare_tensor(index: int, out, ref, tolerance: float | None = None, declared=None) -> OutputError:
    """`out` against `ref`; `declared`: the dtype the compiled graph gives this output, when it lowered it."""
    if not isinstance(ref, torch.Tensor):
        same = out == ref
        return OutputError(index, type(ref).__name__, 0.0 if same else math.inf, 0.0 if same else math.inf,
                           1.0 if same else 0.0, 0.0)
    if out.shape != ref.shape or not (out.dtype == ref.dtype or _lowered(out.dtype, ref.dtype, declared)):
        return OutputError(index, str(ref.dtype).removeprefix("torch."), math.inf, math.inf, 0.0, 0.0)
    if tolerance is None:
        tol = TOLERANCE.get(ref.dtype, 0.0)
    else:  # a lowered model: floating outputs held to its tolerance, integer ones (an argmax) only reported
        tol = tolerance if ref.is_floating_point() else math.inf
    dtype = str(ref.dtype).removeprefix("torch.")
    if out.dtype != ref.dtype:
        dtype = f"{str(out.dtype).removeprefix('torch.')} (of {dtype})"
    if not (ref.is_floating_point() or ref.is_complex()):
        mismatch = (out != ref).double().mean().item() if ref.numel() else 0.0
        return OutputError(index, dtype, float((out.double() - ref.double()).abs().max().item())
                           if ref.numel() else 0.0, mismatch, 1.0 - mismatch, tol)
    rel = relative_error(out, ref)
    finite = torch.isfinite(ref.double())
    diff = (out.double() - ref.double()).abs()[finite]
    max_abs = rel if not math.isfinite(rel) else (float(diff.max().item()) if diff.numel() else 0.0)
    a, b = out.double()[finite].flatten(), ref.double()[finite].flatten()
    denom = (a.norm() * b.norm()).item()
    cosine = (a @ b).item() / denom if denom > 0 else (1.0 if torch.equal(a, b) else 0.0)
    if not math.isfinite(rel):
        cosine = rel if math.isnan(rel) else 0.0
    return OutputError(index, dtype, max_abs, rel, cosine, tol)


def compare(outputs: list, references: list, tolerance: float | None = None, declared: list | None = None) -> Accuracy:
    """Compare flat outputs with flat references, output by output; `tolerance` replaces the dtype's
    own for floating outputs (a quantized model is held to its budget) and lets integer outputs differ
    (their mismatch rate is reported as rel_err); `declared` (Graph.output_dtypes()) lets an output the graph
    returns in fp16/bf16 be compared with its fp32 reference."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs against {len(references)} references")
    declared = declared or [None] * len(outputs)
    return Accuracy([compare_tensor(i, o, r, tolerance, d)
                     for i, (o, r, d) in enumerate(zip(outputs, references, declared))])


class Judge:
    """Whether a compiled program's flat outputs are right on one set of example inputs.

    First against eager's outputs, within the tolerance (the dtype's own, or a lowered compile's). An fp32
    output that misses it is then measured against the exact answer, `exact()` (the captured graph run in
    float64, computed once, on demand): it passes when it is no further from that answer than REFEREE_FACTOR
    times eager's own fp32 output is. That happens only where the model amplifies rounding beyond the
    tolerance — eager itself is then that far off (HF's random-init MobileViT has subnormal outputs, 1e-40,
    where fp32 keeps a few bits: eager is 0.14 from the float64 answer, plain ONNX Runtime 0.12 from eager) —
    while a rewrite that computes something else lands far beyond it. The same holds for a model that is bf16 or
    fp16 itself (blade.llm's precision="bf16" programs: bf16 weights, the logits returned in fp32): its exact
    answer is its own weights and inputs in float64, and eager's rounding is bf16's. NaN never passes.
    """

    def __init__(self, references: list, tolerance: float | None = None, declared: list | None = None,
                 exact: Callable[[], list | None] | None = None, cast: Callable[[], list | None] | None = None):
        self.references, self.tolerance, self.declared = references, tolerance, declared
        self._exact, self._exact_outputs, self._exact_done = exact, None, False
        self._cast, self._cast_outputs, self._cast_done = cast, None, False

    def exact(self) -> list | None:
        if not self._exact_done:
            self._exact_done = True
            self._exact_outputs = self._exact() if self._exact is not None else None
        return self._exact_outputs

    def cast(self) -> list | None:
        """The outputs of the model cast to the compile's low precision (computed once, on demand), or None."""
        if not self._cast_done:
            self._cast_done = True
            self._cast_outputs = self._cast() if self._cast is not None else None
        return self._cast_outputs

    def __call__(self, outputs: list) -> Accuracy:
        accuracy = compare(outputs, self.references, self.tolerance, self.declared)
        misses = [o for o in accuracy.outputs if not o.ok and math.isfinite(o.rel_err)]
        if self.tolerance is not None and misses and self._cast is not None and self.cast() is not None:
            for miss in misses:
                ref, low = self.references[miss.index], self.cast()[miss.index]
                if isinstance(ref, torch.Tensor) and ref.is_floating_point() and isinstance(low, torch.Tensor) \
                        and low.shape == ref.shape:
                    error = relative_error(low.to(ref.dtype), ref)
                    miss.cast_rel_err = error if math.isfinite(error) else None  # an overflow sets no bar
            return accuracy
        misses = [o for o in misses if o.dtype in ("float32", "bfloat16", "float16")]
        if self.tolerance is not None or not misses or self.exact() is None:
            return accuracy
        exact = self.exact()
        for miss in misses:
            truth, out, ref = exact[miss.index], outputs[miss.index], self.references[miss.index]
            if isinstance(truth, torch.Tensor) and truth.shape == ref.shape:
                miss.exact_rel_err = relative_error(out, truth)
                miss.eager_exact_rel_err = relative_error(ref, truth)
        return accuracy


# A graph's floating dtypes that the exact answer promotes to float64: a bf16 or fp16 model's exact answer is its
# weights and inputs, as they are, computed in float64.
LOW_AND_SINGLE = (torch.float32, torch.bfloat16, torch.float16)


def exact_outputs(graph, inputs: list) -> list | None:
    """The graph's flat outputs computed in float64 — its fp32, bf16 and fp16 weights, inputs and dtype arguments
    promoted — or None where it cannot run so (an op without a float64 kernel, a dtype the graph relies on)."""
    return outputs_in(graph, inputs, torch.float64, LOW_AND_SINGLE)


def cast_outputs(graph, inputs: list, dtype: torch.dtype) -> list | None:
    """The graph's flat outputs with every fp32 weight, input and dtype argument cast to `dtype` (bf16, fp16):
    what `model.to(dtype)` computes, the error that precision costs on this model; None where it cannot run so."""
    return outputs_in(graph, inputs, dtype)


def outputs_in(graph, inputs: list, dtype: torch.dtype, replaced: tuple = (torch.float32,)) -> list | None:
    """The graph run with its constants, inputs and dtype arguments of the `replaced` dtypes in `dtype`, or None
    where it cannot."""
    moved = graph.copy()
    for name, tensor in list(moved.constants.items()):
        if tensor.dtype in replaced:
            moved.constants[name] = tensor.to(dtype)
    for node in moved.call_nodes:
        moved.set_args(node, _promoted(node.args, dtype, replaced), _promoted(node.kwargs, dtype, replaced))
    try:
        module = moved.to_fx()
        with torch.no_grad():
            outputs = list(module(*[t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in replaced else t
                                   for t in inputs]))
    except Exception:  # noqa: BLE001 - no answer in that dtype: the verdict at the tolerance stands
        return None
    return outputs


def _promoted(value, dtype: torch.dtype = torch.float64, replaced: tuple = (torch.float32,)):
    if isinstance(value, torch.dtype) and value in replaced:
        return dtype
    if isinstance(value, (list, tuple)):
        return type(value)(_promoted(v, dtype, replaced) for v in value)
    if isinstance(value, dict):
        return {k: _promoted(v, dtype, replaced) for k, v in value.items()}
    return value
