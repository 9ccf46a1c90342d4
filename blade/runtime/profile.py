"""Profiles: each region's time from its backend's profiler, joined to the cost model — MFU, MBU, roofs.

A region is whatever the backend runs as one unit (an ONNX Runtime node with the nodes it fused,
an IR node in PyTorch). Its FLOPs and the bytes crossing its boundary come from the IR at the
call's sizes; MFU = FLOPs / time / the measured matmul peak of its dtype, MBU = bytes / time /
the measured memory bandwidth (a copy or a read). The model's bytes are the least any execution moves (weights,
inputs, outputs); its time is the end-to-end median of calls timed just before and just after the
regions, in the same call.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field

import torch

from blade.perf.cost import GraphCost, graph_cost, region_cost, region_kind, unfused_bytes
from blade.errors import BackendError
from blade.runtime.guards import check_inputs
from blade.ir.graph import Graph, Node
from blade.perf.peaks import Peaks, machine_peaks, peak_dtype
from blade.ops.quantized import QLINEAR
from blade.perf.report import json_safe
from blade.ir.shapes import evaluate
from blade.perf.timing import sample_interleaved


@dataclass
class RegionProfile:
    """One region's time, cost and utilization."""

    name: str
    kind: str
    engine: str
    time_ms: float
    flops: int
    bytes: int
    mfu: float
    mbu: float
    bound: str  # "compute", "memory" or "overhead" (neither FLOPs nor bytes)
    intensity: float | None  # FLOP per byte; None when it moves no bytes
    lost_ms: float  # time above the roof: time - max(FLOPs / peak, bytes / bandwidth)
    peak_dtype: str  # whose matmul peak MFU is against (dtype, or fp32 where dtype's was not measured)
    dtype: str
    bytes_unfused: int  # what its nodes would move one by one
    nodes: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)


@dataclass
class Profile:
    """The whole model's figures, every region's, and the peaks they were measured against."""

    model_name: str
    backend: str
    machine: str
    dims: dict[str, int]
    model: dict
    regions: list[RegionProfile]
    peaks: Peaks
    unknown_ops: dict[str, int]
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return json_safe({"model": self.model, "regions": [asdict(r) for r in self.regions],
                          "peaks": self.peaks.as_dict(), "machine": self.machine, "model_name": self.model_name,
                          "backend": self.backend, "dims": self.dims, "unknown_ops": self.unknown_ops,
                          "warnings": self.warnings})

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def worst(self, top: int) -> list[RegionProfile]:
        """The regions that lose most time against their roof, first."""
        return sorted(self.regions, key=lambda r: -r.lost_ms)[:top]

    def plot(self, path) -> None:
        """A roofline SVG (or PNG/PDF by the suffix): see blade.perf.roofline."""
        from blade.perf.roofline import plot

        plot(self, path)

    def __str__(self) -> str:
        return render(self)


def profile(compiled, tensors: list[torch.Tensor], *, warmup: int = 3, repeat: int = 10,
            peaks: Peaks | None = None) -> Profile:
    """Time the compiled model end to end and region by region on `tensors` (flat, checked inputs)."""
    executable = compiled.executable
    if not executable.has_profiler():  # said before any timing (an Inductor model compiles on its first call)
        raise BackendError(f"backend {compiled.backend!r} cannot profile its regions yet; profile with "
                           "backend='eager' or 'onnxruntime'")
    graph: Graph = compiled.graph
    dims = check_inputs(graph.user_inputs, graph.dims, tensors)
    costs = graph_cost(graph)
    peaks = peaks or machine_peaks(compiled.target)
    call = {"model": lambda: compiled.run_flat(tensors)}
    device = compiled.target.device
    with torch.no_grad():  # end-to-end samples before and after the regions', so drift hits both alike
        samples = sample_interleaved(call, warmup=warmup, repeat=(repeat + 1) // 2, device=device)["model"]
        timings = executable.profile(tensors + graph.state_values(), warmup, repeat)
        samples += sample_interleaved(call, warmup=1, repeat=max(repeat // 2, 1), device=device)["model"]
    seconds = statistics.median(samples)
    regions = [_region(graph, costs, dims, peaks, t, device) for t in timings]
    model = _model(graph, costs, dims, peaks, seconds, regions, device)
    model["time_ms_samples"] = [t * 1e3 for t in samples]  # their spread says how steady the machine was
    return Profile(graph.name, compiled.backend, peaks.device, dims, model, regions, peaks, dict(costs.unknown),
                   _warnings(compiled, model, peaks))


def _warnings(compiled, model: dict, peaks: Peaks) -> list[str]:
    """What makes these figures less than they seem."""
    found = []
    if compiled.backend == "onnxruntime" and compiled.target.device == "cuda":
        found.append("ONNX Runtime's per-node times on CUDA are host-side (launch) times, not kernel times: "
                     "region MFU/MBU are not kernel figures (the model's are)")
    if model["flops"] and model["flops_in_regions"] < 0.9 * model["flops"]:
        found.append(f"only {model['flops_in_regions'] / model['flops']:.0%} of the model's FLOPs were joined to a "
                     "region (an artifact from an older blade, or an exporter that drops node metadata)")
    if model["peak_dtype"] != model["dtype"]:
        found.append(f"no {model['dtype']} peak was measured on this machine: MFU is against the "
                     f"{model['peak_dtype']} peak")
    if model["mfu"] > 1 or model["mbu"] > 1:
        found.append("utilization above 100 %: the cached peaks are too low (measured on a busy machine?); "
                     "measure again with --remeasure-peaks")
    return found


def _region(graph: Graph, costs: GraphCost, dims: dict, peaks: Peaks, timing, device: str) -> RegionProfile:
    members = [graph.node(name) for name in timing.nodes]
    cost = region_cost(graph, members, costs)
    flops, moved = evaluate(cost.flops, dims), evaluate(cost.bytes, dims)
    unfused = sum(evaluate(unfused_bytes(n, costs), dims) for n in members if n.name in costs.nodes)
    dtype = compute_dtype(members, costs, dims, device)
    figures = utilization(flops, moved, timing.seconds, peaks, dtype)
    return RegionProfile(timing.name, region_kind(members), timing.engine, timing.seconds * 1e3, flops, moved,
                         dtype=dtype, bytes_unfused=unfused, nodes=list(timing.nodes), ops=list(timing.ops), **figures)


def model_work(graph: Graph, dims: dict[str, int], costs: GraphCost | None = None,
               device: str = "cpu") -> tuple[int, int, str]:
    """(FLOPs, least bytes, compute dtype) of one call of the whole graph at these dim values."""
    costs = costs or graph_cost(graph)
    least = region_cost(graph, graph.call_nodes, costs).bytes
    return evaluate(costs.flops, dims), evaluate(least, dims), compute_dtype(graph.call_nodes, costs, dims, device)


def _model(graph: Graph, costs: GraphCost, dims: dict, peaks: Peaks, seconds: float,
           regions: list[RegionProfile], device: str) -> dict:
    flops, least, dtype = model_work(graph, dims, costs, device)
    figures = utilization(flops, least, seconds, peaks, dtype)
    region_ms = sum(r.time_ms for r in regions)
    unfused, in_regions = sum(r.bytes_unfused for r in regions), sum(r.bytes for r in regions)
    return {"time_ms": seconds * 1e3, "flops": flops, "bytes": least, "dtype": dtype, **figures,
            "regions_time_ms": region_ms, "coverage": region_ms / (seconds * 1e3),
            "flops_in_regions": sum(r.flops for r in regions),
            "bytes_unfused": unfused, "bytes_in_regions": in_regions, "bytes_saved_by_fusion": unfused - in_regions}


def utilization(flops: int, moved: int, seconds: float, peaks: Peaks, dtype: str) -> dict:
    """mfu, mbu, bound, intensity, lost_ms and peak_dtype of work that took `seconds`."""
    peak, peak_dtype = peaks.flops_peak(dtype)
    roof_s = max(flops / peak, moved / peaks.bandwidth)
    intensity = flops / moved if moved else None
    if flops and (intensity is None or intensity >= peak / peaks.bandwidth):
        bound = "compute"
    else:
        bound = "memory" if moved else "overhead"
    rate = 1 / seconds if seconds > 0 else 0.0
    return {"mfu": flops * rate / peak, "mbu": moved * rate / peaks.bandwidth, "bound": bound,
            "intensity": intensity, "lost_ms": max(seconds - roof_s, 0.0) * 1e3, "peak_dtype": peak_dtype}


def compute_dtype(nodes, costs: GraphCost, dims: dict, device: str = "cpu") -> str:
    """The dtype of the inputs of the node with the most FLOPs (fp32 when none computes); fp32 on a
    GPU counts as tf32 when torch lets matmuls use TF32 (torch.set_float32_matmul_precision)."""
    best: Node | None = None
    most = 0
    for node in nodes:
        cost = costs.nodes.get(node.name)
        flops = evaluate(cost.flops, dims) if cost else 0
        if flops > most:
            best, most = node, flops
    if best is None:
        return "fp32"
    mode = best.kwargs.get("mode", "dynamic") if best.target == QLINEAR else None
    if mode in ("dynamic", "static", "fp8"):  # the matmul runs on the quantized operands
        return "fp8_e4m3" if mode == "fp8" else "int8"
    tensor_args = [r for r in best.refs() if hasattr(r.val, "dtype")]
    dtype = peak_dtype(tensor_args[0].val.dtype) if tensor_args else "fp32"
    if dtype == "fp32" and device == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return dtype


# -- text ----------------------------------------------------------------------------------------

def render(p: Profile, top: int = 15) -> str:
    m = p.model
    dims = ", ".join(f"{k}={v}" for k, v in p.dims.items()) or "static"
    peak, used = p.peaks.flops_peak(m["dtype"])
    lines = [
        f"blade profile: {p.model_name} on {p.backend} ({p.machine}), {dims}",
        f"  peaks     {used} matmul {_amount(peak, 'FLOP/s')}, memory {_amount(p.peaks.bandwidth, 'B/s')} "
        f"(ridge {p.peaks.ridge(used):.1f} FLOP/B; measured {p.peaks.measured_at})",
        f"  model     {m['time_ms']:.3f} ms, {_amount(m['flops'], 'FLOP')}, {_amount(m['bytes'], 'B')} at least "
        f"-> MFU {_pct(m['mfu'])}, MBU {_pct(m['mbu'])}, {m['bound']}-bound",
        f"  regions   {len(p.regions)}, {m['regions_time_ms']:.3f} ms in all = {_pct(m['coverage'])} of end to end; "
        f"bytes node by node {_amount(m['bytes_unfused'], 'B')}, across region boundaries "
        f"{_amount(m['bytes_in_regions'], 'B')} (fusion saved {_amount(m['bytes_saved_by_fusion'], 'B')})",
    ]
    lines += [f"  warning   {w}" for w in p.warnings]
    if p.unknown_ops:
        lines.append("  unknown   " + ", ".join(f"{op} x{n}" for op, n in sorted(p.unknown_ops.items()))
                     + " (counted as 0 FLOPs and 0 bytes)")
    lines.append(f"  top {min(top, len(p.regions))} regions by time lost against their roof:")
    lines.append(f"    {'region':<34} {'kind':<11} {'ms':>8} {'lost ms':>8} {'GFLOP':>8} {'MB':>8} "
                 f"{'MFU':>6} {'MBU':>6}  bound")
    for r in p.worst(top):
        lines.append(f"    {r.name[:34]:<34} {r.kind:<11} {r.time_ms:8.3f} {r.lost_ms:8.3f} {r.flops / 1e9:8.3f} "
                     f"{r.bytes / 1e6:8.2f} {_pct(r.mfu):>6} {_pct(r.mbu):>6}  {r.bound}")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _amount(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}" if not math.isnan(x) else f"nan {unit}"
