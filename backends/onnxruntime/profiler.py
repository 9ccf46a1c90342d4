"""ONNX Runtime session profiling: per-node kernel times, joined to the IR nodes each node computes.

blade's exporter stamps every ONNX node with the IR node it came from. ONNX Runtime's graph
optimizer then fuses nodes (SkipLayerNormalization, BiasGelu, …) under new names; a fused node
computes every original node between its inputs and its outputs, found by walking back from its
outputs through the values that no longer exist. ONNX Runtime nodes that share an IR node (a
linear's MatMul and the Add its bias went to) form one region, so each region's time meets the
whole cost of its IR nodes. On a CUDA session the times are host-side (launch) times.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import onnx

from blade.backends.base import RegionTiming
from blade.backends.onnxruntime.export import IR_NODE_KEY
from blade.backends.onnxruntime.session import OPTIMIZED_MODEL, OrtRunner
from blade.perf.cost import node_kind
from blade.ir.graph import Graph
from blade.target import Target

_KERNEL_SUFFIX = "_kernel_time"


def profile_session(model_file: Path, graph: Graph, target: Target, input_names: list[str],
                    output_names: list[str], tensors: list, warmup: int, repeat: int,
                    shares_cores: bool) -> list[RegionTiming]:
    """Run a profiling twin of the region's session; each region's median time and IR nodes."""
    with tempfile.TemporaryDirectory(prefix="blade-ort-profile-") as tmp:
        runner = OrtRunner(str(model_file), target, input_names, output_names, shares_cores, profile_dir=tmp)
        for _ in range(warmup + repeat):
            runner(tensors)
        trace = json.loads(Path(runner.session.end_profiling()).read_text())
        optimized = onnx.load(str(Path(tmp) / OPTIMIZED_MODEL), load_external_data=False)
    original = onnx.load(str(model_file), load_external_data=False)
    times = kernel_times(trace, warmup)
    return [RegionTiming(_region_name(members, times), "onnxruntime", tuple(times[m][0] for m in members), ir_nodes,
                         sum(times[m][1] for m in members))
            for members, ir_nodes in join_to_ir(original, optimized, graph, set(times))]


def _region_name(members: list[str], times: dict) -> str:
    """The slowest ONNX Runtime node of the group, and how many more it holds."""
    slowest = max(members, key=lambda m: times[m][1])
    return slowest if len(members) == 1 else f"{slowest}+{len(members) - 1}"


def kernel_times(trace: list[dict], warmup: int) -> dict[str, tuple[str, float]]:
    """ONNX Runtime node name -> (op type, median seconds per run), the first `warmup` runs dropped."""
    samples: dict[str, list[float]] = defaultdict(list)
    op_types: dict[str, str] = {}
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith(_KERNEL_SUFFIX):
            name = event["name"].removesuffix(_KERNEL_SUFFIX)
            samples[name].append(event["dur"] / 1e6)
            op_types[name] = event.get("args", {}).get("op_name", "?")
    return {name: (op_types[name], statistics.median(runs[warmup:] or runs)) for name, runs in samples.items()}


def join_to_ir(original: onnx.ModelProto, optimized: onnx.ModelProto, graph: Graph,
               timed: set[str]) -> list[tuple[list[str], tuple[str, ...]]]:
    """Groups of timed ONNX Runtime nodes, each with the IR nodes (of `graph`) it computes."""
    covers = _covered_ir_nodes(original, optimized, {n.name for n in graph.call_nodes})
    joinable = {n.name for n in graph.call_nodes if node_kind(n) != "view"}  # views are cheap and shared: no links
    parent: dict[str, str] = {name: name for name in timed}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    claimed: dict[str, str] = {}  # IR node -> the first timed ONNX Runtime node that computes it
    for name in sorted(timed, key=_order(optimized)):
        for ir_name in sorted(covers.get(name, ())):
            if ir_name not in claimed:
                claimed[ir_name] = name
            elif ir_name in joinable:
                parent[find(name)] = find(claimed[ir_name])
    members: dict[str, list[str]] = defaultdict(list)
    for name in sorted(timed, key=_order(optimized)):
        members[find(name)].append(name)
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    groups = []
    for root, names in members.items():
        ir_nodes = sorted({ir for ir, owner in claimed.items() if find(owner) == root}, key=order.__getitem__)
        groups.append((names, tuple(ir_nodes)))
    return groups


def _order(optimized: onnx.ModelProto):
    position = {node.name: i for i, node in enumerate(optimized.graph.node)}
    return lambda name: (position.get(name, len(position)), name)


def _covered_ir_nodes(original: onnx.ModelProto, optimized: onnx.ModelProto, ir_names: set[str]) -> dict[str, set]:
    """For every optimized node, the IR nodes whose ONNX nodes it runs (itself and what it fused)."""
    by_name = {node.name: node for node in original.graph.node}
    producer = {value: node for node in original.graph.node for value in node.output}
    available = ({v for node in optimized.graph.node for v in node.output} | {v.name for v in optimized.graph.input}
                 | {t.name for t in optimized.graph.initializer})
    covers = {}
    for node in optimized.graph.node:  # a node that kept its name may still have absorbed others (Conv+Add)
        origins = _fused_origins(node, producer, available) + ([by_name[node.name]] if node.name in by_name else [])
        covers[node.name] = {name for o in origins if (name := _ir_name(o)) in ir_names}
    return covers


def _fused_origins(node: onnx.NodeProto, producer: dict, available: set[str]) -> list[onnx.NodeProto]:
    """The original nodes a fused node replaced: producers of its outputs, and back through every
    value it consumed that no longer exists."""
    stack = [producer[v] for v in node.output if v in producer]
    seen: dict[str, onnx.NodeProto] = {}
    while stack:
        current = stack.pop()
        if current.name in seen:
            continue
        seen[current.name] = current
        stack += [producer[v] for v in current.input if v and v not in available and v in producer]
    return list(seen.values())


def _ir_name(node: onnx.NodeProto) -> str | None:
    """The IR node blade's exporter stamped on the ONNX node (older artifacts: torch's FX node name)."""
    props = {prop.key: prop.value for prop in node.metadata_props}
    if IR_NODE_KEY in props:
        return props[IR_NODE_KEY]
    fx_text = props.get("pkg.torch.onnx.fx_node", "")
    return fx_text[1:].split(" ", 1)[0] if fx_text.startswith("%") else None
