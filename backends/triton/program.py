"""The Triton program: kernels written and loaded through an on-disk cache, the host program (fx) that runs them
in order with PyTorch for everything else, and the buffer plan that reuses intermediates' memory."""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import threading
from pathlib import Path

import torch

from blade.backends.base import Executable
from blade.backends.triton.codegen import KernelSource, Unsupported, generate
from blade.backends.triton.launcher import LOOP_BLOCK, RegionKernel, autotune_enabled
from blade.config import cache_root
from blade.ir.fused import is_fused
from blade.ir.graph import Graph, Node, TensorMeta
from blade.ops.quantized import QLINEAR

PLAN = "plan.json"
KERNELS = "kernels"


def kernel_dir() -> Path:
    return cache_root() / "triton" / "kernels"


def load_kernel(source: KernelSource) -> tuple[object, bool]:
    """The jitted kernel from the cache file named by its source hash (written when absent): (kernel, was cached).

    triton.jit reads its function's source from a file, so every kernel lives in one; the name is the
    hash of the source (and of the Triton version), so equal kernels share one file across compiles."""
    import triton

    folder = kernel_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{source.name}_{source.digest}_{triton.__version__.replace('.', '_')}"
    path = folder / f"{stem}.py"
    cached = path.is_file() and path.read_text() == source.source
    if not cached:
        temporary = folder / f".{stem}.{os.getpid()}.{threading.get_ident()}.tmp"
        temporary.write_text(source.source)
        os.replace(temporary, path)  # atomic: a concurrent compile sees the old or the new file, whole
    spec = importlib.util.spec_from_file_location(f"blade_triton_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, source.name), cached


def _tuned(kernel, source: KernelSource):
    """Wrap a CUDA kernel in triton.autotune over a small config space (results cached on disk when supported)."""
    import triton

    if source.kind == "loop":
        configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((256, 2), (1024, 4), (4096, 8))]
        key = ["numel"]
    elif source.kind == "matmul_epilogue":
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                   for m, n, k, w, s in ((64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 4),
                                         (64, 128, 64, 4, 4), (32, 64, 32, 4, 2))]
        key = ["M", "N", "K"]
    else:
        return kernel, False
    options = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=key, **options)(kernel), True


class BufferPlan:
    """Kernel outputs that never escape (not graph outputs, not read through views) share slots when their
    lifetimes do not overlap; each thread keeps its own slot memory, grown to the largest size seen."""

    def __init__(self, graph: Graph, kernel_nodes: list[Node]):
        order = {node: i for i, node in enumerate(graph.call_nodes)}
        last_use: dict[Node, int] = {}
        for node in graph.call_nodes:
            for ref in _refs(node):
                last_use[ref] = order[node]
        escaping = {o for o in graph.outputs if isinstance(o, Node)}
        self.slots: dict[str, int] = {}  # node name -> slot
        free_at: list[int] = []  # slot -> index after which it is free
        for node in sorted(kernel_nodes, key=order.get):
            readers = graph.users(node)
            # a view (or anything aliasing its input) keeps the memory alive past the last direct reader
            if node in escaping or not isinstance(node.val, TensorMeta) or any(_aliases(r) for r in readers):
                continue
            start, end = order[node], last_use.get(node, order[node])
            slot = next((s for s, free in enumerate(free_at) if free < start), None)
            if slot is None:
                slot, free_at = len(free_at), free_at + [end]
            else:
                free_at[slot] = end
            self.slots[node.name] = slot
        self.local = threading.local()

    def allocator(self, node_name: str):
        slot = self.slots.get(node_name)
        if slot is None:
            return None

        def allocate(index: int, shape, dtype, device) -> torch.Tensor:
            memory = getattr(self.local, "memory", None)
            if memory is None:
                memory = self.local.memory = {}
            numel = 1
            for size in shape:
                numel *= size
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            held = memory.get((slot, device))
            if held is None or held.numel() < nbytes:
                held = memory[(slot, device)] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            return held[:nbytes].view(dtype).view(shape)
        return allocate

    def as_dict(self) -> dict:
        return {"slots": len(set(self.slots.values())), "planned_buffers": len(self.slots)}


def _refs(node: Node):
    from blade.ir.graph import map_refs

    found = []
    map_refs((node.args, node.kwargs), lambda ref: found.append(ref) or ref)
    return found


# ops that share their input's memory though their schema does not say so
_UNANNOTATED_ALIASES = [["aten", op] for op in ("_unsafe_view", "unsafe_split", "unsafe_chunk",
                                                 "unsafe_split_with_sizes", "dropout", "feature_dropout")]


def _aliases(node: Node) -> bool:
    """Whether a node's result may share memory with an argument: a view by its schema, getitem, or an op
    with no schema to tell (anything not a plain ATen op is assumed to)."""
    if getattr(node.target, "__name__", "") == "getitem" or str(node.target).split(".")[:2] in _UNANNOTATED_ALIASES:
        return True
    if is_fused(node) or isinstance(node.target, RegionKernel):
        return False  # a region's outputs are fresh tensors (its kernel's, or its body's ops')
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return True
    return any(r.alias_info is not None for r in schema.returns)


class TritonProgram(Executable):
    """Runs the graph: fused regions as generated kernels, blade::qlinear through the Triton qgemm kernels, every
    other node as its PyTorch op."""

    backend = "triton"

    def __init__(self, graph: Graph, interpret: bool):
        self.graph = graph
        self.kernels: dict[str, KernelSource] = {}
        self.fallbacks: dict[str, str] = {}
        self.cache = {"hits": 0, "written": 0}
        program = graph.copy()
        launchers: dict[str, RegionKernel] = {}
        tune = autotune_enabled() and not interpret
        for index, node in enumerate(program.call_nodes):
            if not is_fused(node):
                continue
            region = node.target
            try:
                source = generate(region, f"k{index}_{region.kind}_{region.pattern}".replace("-", "_"))
            except Unsupported as exc:
                self.fallbacks[node.name] = f"{region.describe()}: {exc}"
                continue
            kernel, cached = load_kernel(source)
            self.cache["hits" if cached else "written"] += 1
            kernel, tuned = _tuned(kernel, source) if tune else (kernel, False)
            outputs = list(region.body.outputs)
            launchers[node.name] = RegionKernel(source, kernel, [o.val.dtype for o in outputs],
                                                [o.val.rank for o in outputs], region.multiple_outputs, tuned)
            self.kernels[node.name] = source
        self.plan = BufferPlan(program, [n for n in program.call_nodes if n.name in launchers])
        for node in program.call_nodes:
            if node.name in launchers:
                launcher = launchers[node.name]
                allocate = self.plan.allocator(node.name)
                if allocate is not None:
                    launcher.allocate = allocate
                node.target = launcher
        self.qgemm_nodes = self._route_qlinear(program, interpret)
        self.module = program.to_fx()

    @staticmethod
    def _route_qlinear(program: Graph, interpret: bool) -> list[str]:
        """The blade::qlinear nodes that run the Triton qgemm kernels. Under the interpreter (CPU tests) the nodes
        call qgemm_triton.qlinear directly, as the op would dispatch on CPU to its reference; on CUDA the op itself
        runs them, where the kernel registry has them for it (a GPU with Triton, no override)."""
        nodes = [n for n in program.call_nodes if n.target == QLINEAR]
        if not nodes:
            return []
        from blade.backends.kernels import qgemm_triton, registry

        if interpret:
            for node in nodes:
                node.target = qgemm_triton.qlinear
            return [n.name for n in nodes]
        if not registry.runs("qlinear", "cuda", "triton"):
            return []
        return [n.name for n in nodes if isinstance(n.val, TensorMeta) and n.val.device == "cuda"]

    def __call__(self, *tensors) -> list:
        with torch.no_grad():
            return list(self.module(*tensors))

    def describe(self) -> dict:
        fused = len(self.kernels) + len(self.fallbacks)
        torch_ops = sum(1 for n in self.graph.call_nodes if not is_fused(n))
        return {"kernels": len(self.kernels), "fused_regions": fused, "fallback_regions": self.fallbacks,
                "torch_ops": torch_ops, "qgemm_nodes": len(self.qgemm_nodes), "kernel_cache": dict(self.cache),
                **self.plan.as_dict(),
                "kernel_kinds": {k: sum(1 for s in self.kernels.values() if s.kind == k)
                                 for k in ("loop", "reduction", "matmul_epilogue")}}

    def sources(self) -> str:
        """The host program (fx Python) and every kernel's Triton source, for reading."""
        parts = ["# host program\n" + self.module.code]
        parts += [f"# kernel for {node}\n{source.source}" for node, source in self.kernels.items()]
        return "\n".join(parts)

    def save(self, directory: str) -> None:
        """The plan and the kernels' sources (for inspection; loading regenerates them from the IR)."""
        root = Path(directory)
        (root / KERNELS).mkdir(parents=True, exist_ok=True)
        for node, source in self.kernels.items():
            (root / KERNELS / f"{source.name}.py").write_text(source.source)
        (root / KERNELS / "host_program.py").write_text(self.module.code)
        plan = {"kernels": {node: {"name": s.name, "kind": s.kind, "sha256_16": s.digest}
                            for node, s in self.kernels.items()},
                "fallback_regions": self.fallbacks, "loop_block": LOOP_BLOCK}
        (root / PLAN).write_text(json.dumps(plan, indent=1, sort_keys=True))
