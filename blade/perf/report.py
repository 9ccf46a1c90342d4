"""The compile report: what every pass did, node counts, timings, accuracy against eager."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from blade.perf.accuracy import Accuracy


@dataclass
class CompileReport:
    """Readable with str(), machine-readable with as_dict() / to_json()."""

    model: str
    backend: str = ""
    backend_reason: str = ""
    target: dict = field(default_factory=dict)
    optimize: int = 0
    dims: list[str] = field(default_factory=list)
    specialized: list[str] = field(default_factory=list)
    passes: list[dict] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    ops_before: dict = field(default_factory=dict)
    ops_after: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    backend_details: dict = field(default_factory=dict)  # the backend's own account: regions, fallbacks
    backend_candidates: dict = field(default_factory=dict)  # measured auto: every candidate's time or error
    accuracy: Accuracy | None = None
    quantization: dict = field(default_factory=dict)  # precision/quantize: layers lowered, kept, errors
    matmul_precision: dict = field(default_factory=dict)  # every matmul/conv/attention node -> what it computes in
    cache: dict = field(default_factory=dict)  # {"hit", "key", "path", ...} when the compile cache was used
    bisection: dict = field(default_factory=dict)  # the accuracy bisection, when the compile missed its tolerance
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "accuracy"}
        data["accuracy"] = self.accuracy.as_dict() if self.accuracy else None
        return json_safe(data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "CompileReport":
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "accuracy"}
        report = cls(**fields)
        if data.get("accuracy"):
            report.accuracy = Accuracy.from_dict(data["accuracy"])
        return report

    def __str__(self) -> str:
        lines = [f"blade compile report: {self.model}",
                 f"  backend   {self.backend}  ({self.backend_reason})",
                 f"  target    {self.target.get('device', '?')} {self.target.get('name', '')}",
                 f"  optimize  O{self.optimize}"]
        if self.dims:
            lines.append(f"  dims      {', '.join(self.dims)}")
        for text in self.specialized:
            lines.append(f"  specialized: {text}")
        lines.append(f"  nodes     {self.nodes_before} -> {self.nodes_after}")
        for record in self.passes:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(record["counts"].items())) or "no change"
            lines.append(f"  pass {record['name']:<10} {record['nodes_before']} -> {record['nodes_after']} nodes "
                         f"in {record['seconds'] * 1e3:.1f} ms: {counts}")
            lines += [f"      {note}" for note in record["notes"]]
        for name, result in self.backend_candidates.items():
            what = (f"{result['ms']:.3g} ms (compiled in {result['compile_s']:.1f} s)" if "ms" in result
                    else result.get("error") or f"not measured: {result.get('skipped')}")
            lines.append(f"  candidate {name}: {what}")
        if self.matmul_precision:
            tally: dict[str, int] = {}
            for what in self.matmul_precision.values():
                tally[what] = tally.get(what, 0) + 1
            lines.append("  matmuls   " + ", ".join(f"{n} in {what}" for what, n in sorted(tally.items())))
        nodes = self.backend_details.get("nodes")
        if nodes:
            lines.append("  placement " + "; ".join(f"{n} nodes on {engine}" for engine, n in nodes.items()))
        for region in self.backend_details.get("regions", []):
            if region.get("reason"):
                lines.append(f"  fallback  region {region['index']} ({region['nodes']} nodes) on PyTorch: "
                             f"{region['reason']}")
        if self.cache:
            what = "hit: loaded" if self.cache.get("hit") else f"miss: {self.cache.get('stored', '')}"
            lines.append(f"  cache     {what} {self.cache.get('key')} ({self.cache.get('path')})")
        if self.seconds:
            lines.append("  seconds   " + ", ".join(f"{k} {v:.3f}" for k, v in self.seconds.items()))
        if self.bisection:

            lines.append(f"  bisection {describe_bisection(self.bisection)}")
        if self.accuracy is not None:
            acc = self.accuracy
            verdict = "ok" if acc.ok else "OUT OF TOLERANCE"
            if acc.ok and any(o.cast_rel_err is not None for o in acc.refereed):
                verdict = "ok: no less accurate than the model cast to its precision (which misses the tolerance)"
            elif acc.ok and acc.refereed:
                verdict = "ok against the float64 answer (eager's own fp32 rounding misses the tolerance here)"
            lines.append(f"  accuracy  rel_err {acc.rel_err:.3g}, max_abs {acc.max_abs:.3g}, "
                         f"cosine {acc.cosine:.6f} over {len(acc.outputs)} outputs: {verdict}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def json_safe(value):
    """Non-finite floats as strings, so the report is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def describe_bisection(bisection: dict) -> str:
    """The report's one line for a bisection (as_dict form)."""
    culprits = ", ".join(f"{c['pass']} at {c['site'] if c['site'] != '*' else '(the whole pass)'}"
                         for c in bisection.get("culprits", []))
    after = f"rel_err {bisection['error_before']:.3g} -> {bisection['error_after']:.3g}"
    where = {"held back": f"held back {culprits}", "unoptimized graph": "no held-back rewrite passed: the "
             f"unoptimized graph on {bisection['backend']}", "eager backend": "no pass at fault on this backend: "
             "the unoptimized graph on the eager backend", "nothing passes": "even the unoptimized graph on the "
             "eager backend misses"}[bisection["outcome"]]
    return (f"{where} ({after}; {bisection['trials']} trials on {bisection['searched_on']} in "
            f"{bisection['seconds']:.1f} s)")
