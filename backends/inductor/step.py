"""The inductor_step backend: the eager backend's program, with the ops between blade's kernel calls compiled by Inductor.

A decode step of a small LM on the CPU is ~600 tiny torch ops (norms, RoPE, views, cache writes) around ~60 kernel
calls; run op by op, the tiny ops cost as much as the kernels of an int4 model (bench/results/
llm_decode_breakdown_llama_int4.md). Here the graph runs exactly the eager backend's kernels (aten.linear, blade's
attention and quantized ops as the kernel registry chooses per call, through kernel_calls' cheap torch.library ops)
and writes a mutated input in place where the eager backend would (inplace.py); torch.compile (Inductor, fullgraph,
no freezing: the weights stay inputs, so nothing is copied or folded) fuses everything else into a few C++ loops a
layer. Inductor compiles on the first call (seconds) and once more for a new kind of shape: the inputs' dynamic dims
are compiled symbolic the first time they are all 2 or more, and a size of 1, which dynamo specializes, compiles on
its own (a decode step at batch 1, another for batches 2..max). Saved artifacts hold nothing of Inductor's: loading
compiles again on the first call. CPU only (Inductor's C++ code needs a compiler); blade.llm picks it for the
decode program by default there (docs/llm.md); blade.compile's backend="auto" does not.
"""
from __future__ import annotations

import shutil
import threading

import torch

from blade import config
from blade.backends.base import Backend, Executable, placement
from blade.backends.eager.inplace import in_place_writes
from blade.backends.inductor.kernel_calls import kernel_ops
from blade.errors import BackendError
from blade.ir.graph import Graph, Node
from blade.target import Target


class StepExecutable(Executable):
    """torch.compile (Inductor) of the graph's fx module with blade's kernels as extern calls, under no_grad."""

    backend = "inductor_step"

    def __init__(self, graph: Graph, device: str = "cpu"):
        self.name = graph.name
        ops = kernel_ops()
        kernels = {n.name: ops[n.target] for n in graph.call_nodes if n.target in ops}
        self.module = graph.to_fx({**kernels, **in_place_writes(graph)})
        self.compiled = torch.compile(self.module, backend="inductor", fullgraph=True)
        self.dynamic_dims = [(i, d) for i, node in enumerate(graph.inputs)
                             for d, size in enumerate(node.val.shape) if not isinstance(size, int)]
        self.symbolic = not self.dynamic_dims  # whether the symbolic-shape graph has been compiled
        self.placement = placement(graph, "inductor (its C++ loops) around blade's kernel calls", device)
        self._lock = threading.Lock()

    def __call__(self, *tensors) -> list:
        if not self.symbolic and all(tensors[i].shape[d] >= 2 for i, d in self.dynamic_dims):
            with self._lock:
                for i, d in self.dynamic_dims:
                    torch._dynamo.maybe_mark_dynamic(tensors[i], d)
                outputs = self._run(tensors)
                self.symbolic = True
                return outputs
        return self._run(tensors)

    def _run(self, tensors) -> list:
        with torch.no_grad():
            try:
                return list(self.compiled(*tensors))
            except torch._dynamo.exc.TorchDynamoException as exc:  # a compile failure, named as blade's
                reason = str(exc).strip().splitlines()
                raise BackendError(f"torch.compile (inductor) could not compile {self.name} around blade's kernels: "
                                   f"{type(exc).__name__}: {reason[0][:300] if reason else ''}; use "
                                   "backend='eager'") from exc

    def describe(self) -> dict:
        return {"compiler": f"torch.compile (inductor) around blade's kernel calls, torch {torch.__version__}",
                **self.placement}

    def save(self, directory: str) -> None:
        """Nothing beyond the IR and weights: loading compiles again."""


class StepBackend(Backend):
    name = "inductor_step"

    def available(self, target: Target) -> bool:
        return target.device == "cpu" and shutil.which(config.cxx()) is not None

    def unavailable_reason(self, target: Target) -> str:
        if target.device != "cpu":
            return "it runs on the CPU only"
        return f"no C++ compiler for Inductor's code ({config.cxx()!r} is not on PATH)"

    def auto_available(self, target: Target) -> bool:
        return False  # blade.llm asks for it by name; blade.compile's auto keeps its own rule

    def supports(self, node: Node) -> bool:
        return True

    def compile(self, graph: Graph, target: Target, example_inputs=None) -> StepExecutable:
        """Compiles now, on the example inputs when given (so that a failure is a compile-time BackendError)."""
        executable = StepExecutable(graph, target.device)
        if example_inputs is not None:
            executable(*example_inputs)
        return executable

    def load(self, directory: str, graph: Graph, target: Target) -> StepExecutable:
        return StepExecutable(graph, target.device)
