"""The ONNX Runtime backend: partition, lower supported regions to ONNX, run them in reused sessions."""
from __future__ import annotations

import json
import operator
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from blade.backends.eager import EagerExecutable
from blade.backends.base import Backend, Executable, RegionTiming
from blade.backends.onnxruntime.export import OPSET, export_region, save_model
from blade.backends.onnxruntime.profiler import profile_session
from blade.backends.onnxruntime.session import OrtRunner, cuda_available
from blade.backends.onnxruntime.translations import TRANSLATIONS
from blade.backends.partition import Region, build_region, partition
from blade.errors import ArtifactError, BackendError
from blade.ir.fused import FusedRegion
from blade.ir.graph import Graph, Node, format_target, iter_graphs
from blade.target import Target

PLAN = "plan.json"
ONNX_CONTROL_FLOW = ("cond", "while_loop")  # torch.onnx has no translation of map_impl: it runs in PyTorch
_NAMESPACES = ("aten", "prims")


def supports(node: Node) -> bool:
    """ATen/prims ops (torch's exporter covers them), blade ops with a translation, and fused
    regions whose every op is supported."""
    target = node.target
    if target in TRANSLATIONS:
        return True
    if isinstance(target, FusedRegion):
        return all(supports(n) for n in target.body.call_nodes)
    if isinstance(target, torch._ops.HigherOrderOperator):  # torch.onnx emits If for cond, Loop for while_loop
        return target.name() in ONNX_CONTROL_FLOW and all(
            supports(n) for nested in iter_graphs((node.args, node.kwargs)) for n in nested.call_nodes)
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace in _NAMESPACES
    return False


@dataclass
class Step:
    """One region at run time: where it runs, what it reads and writes (parent node names)."""

    region: Region
    runner: object
    engine: str  # "onnxruntime" | "torch"
    file: str | None = None


class OrtExecutable(Executable):
    """Runs the regions in order; tensors pass between them by node name."""

    backend = "onnxruntime"

    def __init__(self, graph: Graph, steps: list[Step], workdir: Path, keep: object = None):
        self.graph, self.steps, self.workdir = graph, steps, workdir
        self._keep = keep  # the TemporaryDirectory holding the .onnx files, alive as long as we are

    def __call__(self, *tensors) -> list:
        env = {n.name: t for n, t in zip(self.graph.inputs, tensors)}
        for step in self.steps:
            outs = step.runner([env[name] for name in step.region.inputs])
            env.update(zip(step.region.outputs, outs))
        return [self._value(o, env) for o in self.graph.outputs]

    def has_profiler(self) -> bool:
        return True

    def profile(self, tensors: list, warmup: int, repeat: int) -> list[RegionTiming]:
        """ONNX Runtime regions from a profiling twin of each session, PyTorch regions from torch.profiler."""
        env = {n.name: t for n, t in zip(self.graph.inputs, tensors)}
        shares_cores = any(step.engine == "torch" for step in self.steps)
        timings: list[RegionTiming] = []
        for step in self.steps:
            inputs = [env[name] for name in step.region.inputs]
            if step.file:
                timings += profile_session(self.workdir / step.file, step.region.graph, step.runner.target,
                                           step.region.inputs, step.region.outputs, inputs, warmup, repeat,
                                           shares_cores)
            elif step.engine == "torch":
                timings += EagerExecutable(step.region.graph).profile(inputs, warmup, repeat)
            env.update(zip(step.region.outputs, step.runner(inputs)))
        return timings

    def _value(self, out, env):
        if not isinstance(out, Node):
            return out
        return env[out.name] if out.name in env else self.graph.constants[out.name]

    def describe(self) -> dict:
        """Where every node ran and why each fallback happened (for the report and the manifest)."""
        counts = {"onnxruntime": 0, "torch": 0}
        regions = []
        for step in self.steps:
            counts[step.engine] += len(step.region.nodes)
            regions.append({"index": step.region.index, "engine": step.engine, "nodes": len(step.region.nodes),
                            "reason": step.region.reason, "file": step.file})
        return {"opset": OPSET, "nodes": counts, "regions": regions}

    def save(self, directory: str) -> None:
        out = Path(directory)
        plan = {"opset": OPSET, "regions": []}
        for step in self.steps:
            if step.file:
                for produced in self.workdir.glob(f"{step.file}*"):
                    shutil.copyfile(produced, out / produced.name)
            plan["regions"].append({"engine": step.engine, "file": step.file, "reason": step.region.reason,
                                    "nodes": [n.name for n in step.region.nodes], "outputs": step.region.outputs})
        (out / PLAN).write_text(json.dumps(plan, indent=1))

    def exports_onnx(self) -> bool:
        """One region, run by ONNX Runtime: no PyTorch fallback."""
        return len(self.steps) == 1 and self.steps[0].engine == "onnxruntime"

    def to_onnx(self, path) -> None:
        """A plain .onnx (weights in `<path>.data`) (blade ops as ONNX Runtime contrib ops); needs a graph with no fallback."""
        if not self.exports_onnx():
            fallbacks = [s.region.reason for s in self.steps if s.engine == "torch"]
            raise BackendError(f"the graph does not run in ONNX Runtime alone ({len(self.steps)} regions; "
                               f"PyTorch fallbacks: {fallbacks}); a single .onnx cannot hold it")
        save_model(onnx.load(str(self.workdir / self.steps[0].file)), Path(path))


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def available(self, target: Target) -> bool:
        return target.device == "cpu" or cuda_available()

    def supports(self, node: Node) -> bool:
        return supports(node)

    def refuses(self, graph: Graph, target: Target) -> str | None:
        """Why measured selection should not try this backend on `graph` (None: it can run it)."""
        if target.device == "cpu" and any(_computes_bf16(n) for n in graph.call_nodes):
            return "the graph computes in bf16 and ONNX Runtime has no bf16 matmul kernels on CPU"
        return None

    def compile(self, graph: Graph, target: Target, example_inputs=None) -> OrtExecutable:
        """Partition, export and load each region; a node the exporter refuses goes to PyTorch alone."""
        if example_inputs is None:
            raise BackendError("the onnxruntime backend needs example inputs to export the graph")
        refused: dict[str, str] = {}  # node name -> why the exporter could not translate it
        if target.device == "cpu" and any(_computes_bf16(n) for n in graph.call_nodes):
            # one PyTorch region, not ONNX Runtime regions cut at every matmul (each cut costs a session switch)
            refused.update({n.name: "the graph computes in bf16 (precision='bf16' or a bf16 model) and ONNX "
                            "Runtime has no bf16 matmul kernels on CPU, so it runs in PyTorch (backend='eager' "
                            "says so directly)" for n in graph.call_nodes})
        for _ in range(_MAX_REFUSALS):
            try:
                return self._compile_partitioned(graph, target, example_inputs, refused)
            except _NodeRefused as exc:
                refused[exc.node] = exc.reason
        raise BackendError(f"the ONNX exporter refused more than {_MAX_REFUSALS} nodes of {graph.name}: "
                           f"{sorted(refused)}; use backend='eager'")

    def _compile_partitioned(self, graph: Graph, target: Target, example_inputs, refused: dict) -> OrtExecutable:
        keep = tempfile.TemporaryDirectory(prefix="blade-ort-")
        workdir = Path(keep.name)
        env = {n.name: t for n, t in zip(graph.inputs, example_inputs)}
        steps = []
        for region in partition(graph, lambda node: node.name not in refused and supports(node)):
            inputs = [env[name] for name in region.inputs]
            step = self._compile_region(region, inputs, target, workdir, refused)
            env.update(zip(region.outputs, step.runner(inputs)))
            steps.append(step)
        if any(step.engine == "torch" for step in steps):  # sessions that alternate with PyTorch: no spinning
            for step in steps:
                if step.file:
                    step.runner = OrtRunner(str(workdir / step.file), target, step.region.inputs,
                                            step.region.outputs, shares_cores=True)
        return OrtExecutable(graph, steps, workdir, keep)

    def _compile_region(self, region: Region, inputs, target: Target, workdir: Path, refused: dict) -> Step:
        if not region.supported:
            region.reason = region.reason or _unsupported_reason(region, refused)
            return Step(region, _torch_runner(region.graph), "torch")
        if not region.graph.outputs:
            return Step(region, lambda tensors: [], "onnxruntime")
        file = f"region_{region.index}.onnx"
        try:
            save_model(export_region(region.graph, inputs, target.device), workdir / file)
            runner = OrtRunner(str(workdir / file), target, region.inputs, region.outputs)
        except Exception as exc:  # the exporter or ONNX Runtime said no
            node = _refused_node(exc, region)
            if node is not None and node not in refused:
                raise _NodeRefused(node, f"the ONNX exporter cannot translate it: {_summary(exc)}") from exc
            region.supported = False  # no single culprit: this region runs in PyTorch
            region.reason = f"ONNX export or session failed: {type(exc).__name__}: {_summary(exc)}"
            return Step(region, _torch_runner(region.graph), "torch")
        return Step(region, runner, "onnxruntime", file)

    def load(self, directory: str, graph: Graph, target: Target) -> OrtExecutable:
        root = Path(directory)
        try:
            plan = json.loads((root / PLAN).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{root / PLAN} is missing or damaged: {exc}") from exc
        steps = []
        shares_cores = any(entry["engine"] == "torch" for entry in plan["regions"])
        for index, entry in enumerate(plan["regions"]):
            nodes = [graph.node(name) for name in entry["nodes"]]
            region = build_region(graph, index, entry["engine"] == "onnxruntime", nodes, f"{graph.name}_region{index}",
                                  outputs=[graph.node(name) for name in entry["outputs"]])
            region.reason = entry.get("reason", "")
            if entry["engine"] == "torch":
                steps.append(Step(region, _torch_runner(region.graph), "torch"))
                continue
            if not entry["file"]:
                steps.append(Step(region, lambda tensors: [], "onnxruntime"))
                continue
            try:
                runner = OrtRunner(str(root / entry["file"]), target, region.inputs, region.outputs, shares_cores)
            except Exception as exc:
                raise ArtifactError(f"ONNX model {entry['file']} in {root} could not be loaded by ONNX Runtime "
                                    f"({_summary(exc)}); the artifact is damaged — recompile it") from exc
            steps.append(Step(region, runner, "onnxruntime", entry["file"]))
        return OrtExecutable(graph, steps, root)


def _computes_bf16(node: Node) -> bool:
    """A node other than a cast whose result is bf16."""
    metas = node.val if isinstance(node.val, tuple) else (node.val,)
    return node.target is not torch.ops.aten._to_copy.default and any(
        getattr(m, "dtype", None) == torch.bfloat16 for m in metas)


def _torch_runner(graph: Graph):
    """A PyTorch region, called like an OrtRunner (with a list of tensors)."""
    executable = EagerExecutable(graph)
    return lambda tensors: executable(*tensors)


_MAX_REFUSALS = 16


class _NodeRefused(Exception):
    """The exporter named one node it cannot translate: partition again without it."""

    def __init__(self, node: str, reason: str):
        super().__init__(node)
        self.node, self.reason = node, reason


def _refused_node(exc: BaseException, region: Region) -> str | None:
    match = re.search(r"translating node %(\w+)", _plain_text(exc))
    members = {n.name for n in region.nodes}
    return match.group(1) if match and match.group(1) in members else None


def _unsupported_reason(region: Region, refused: dict) -> str:
    by_reason: dict[str, list[str]] = {}
    for n in region.nodes:
        if n.name in refused:
            by_reason.setdefault(refused[n.name], []).append(f"{format_target(n.target)} ({n.name})")
    parts = [(f"{nodes[0]}: " if len(nodes) == 1 else f"{len(nodes)} nodes ({', '.join(nodes[:3])}, …): ") + reason
             for reason, nodes in by_reason.items()]
    targets = sorted({format_target(n.target) for n in region.nodes
                      if n.name not in refused and n.target is not operator.getitem and not supports(n)})
    if targets:
        parts.insert(0, f"no ONNX translation for {', '.join(targets)}")
    return "; ".join(parts) or "reads a tuple from a PyTorch op"


def _plain_text(exc: BaseException) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc))


def _summary(exc: BaseException) -> str:
    """The first line of the exporter's exception summary (or of the message), without colour codes."""
    text = _plain_text(exc).strip()
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1].strip()
        text = re.sub(r"^<class '[\w.]+\.(\w+)'>: ", r"\1: ", text)
    return text.splitlines()[0][:300] if text else ""
