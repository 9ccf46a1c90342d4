"""Accuracy of outputs against a reference: relative error, max abs error, cosine — NaN never passes."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

# Relative-error tolerance per output dtype (DESIGN.md, Measuring).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@dataclass
class OutputError:
    index: int
    dtype: str
    max_abs: float
    rel_err: float
    cosine: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tolerance  # False for NaN


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
                "outputs": [asdict(o) for o in self.outputs]}

    @classmethod
    def from_dict(cls, data: dict) -> "Accuracy":
        numeric = ("max_abs", "rel_err", "cosine", "tolerance")
        return cls([OutputError(**{k: float(v) if k in numeric else v for k, v in o.items()})
                    for o in data.get("outputs", [])])


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
