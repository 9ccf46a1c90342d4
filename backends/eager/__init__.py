"""The eager reference backend: IR → torch.fx GraphModule → PyTorch, op by op."""
from __future__ import annotations

import torch

from blade.backends.base import Backend, Executable, RegionTiming, placement
from blade.backends.eager.fast_calls import FAST_CALLS
from blade.backends.eager.inplace import in_place_writes
from blade.backends.eager.profiler import profile_module
from blade.backends.kernels import registry
from blade.ir.graph import Graph, Node, format_target
from blade.ops.attention import FLASH_ATTENTION
from blade.ops.quantized import Q4LINEAR, QEMBEDDING, QLINEAR, qembedding_reference
from blade.target import Target


# What the registry runs these ops with on the CPU and CUDA devices (blade's ops are routed to the same functions)
DIRECT = {torch.ops.aten.linear.default: registry.linear, FLASH_ATTENTION: registry.flash_attention,
          QLINEAR: registry.qlinear, Q4LINEAR: registry.q4linear, QEMBEDDING: qembedding_reference}


class EagerExecutable(Executable):
    """Runs the graph's fx module under no_grad; writes into a mutated input that nothing else reads run in that
    input's memory (a KV cache update costs the new rows, not a copy of the cache); aten.linear, blade's attention
    and quantized linear call the kernel registry's choice directly (for aten.linear: blade's skinny kernel on 1..8
    rows on CPU, else torch's), and blade's int8 embedding its reference, skipping the dispatcher's 6-30 µs a call
    that a decode step pays ~60 times; the commonest small aten ops run as the torch functions that bind them
    (fast_calls), without OpOverload's layer."""

    backend = "eager"

    def __init__(self, graph: Graph, device: str = "cpu", fast_calls: bool = True):
        table = FAST_CALLS if fast_calls else {}
        fast = {n.name: table[n.target] for n in graph.call_nodes if n.target in table}
        writes = {name: table.get(op, op) for name, op in in_place_writes(graph).items()}
        direct = {n.name: DIRECT[n.target] for n in graph.call_nodes if n.target in DIRECT}
        self.module = graph.to_fx({**fast, **writes, **direct})
        self.ops = {n.name: format_target(n.target) for n in graph.call_nodes}
        self.placement = placement(graph, "torch (op by op)", device)

    def describe(self) -> dict:
        return dict(self.placement)

    def __call__(self, *tensors) -> list:
        with torch.no_grad():
            return list(self.module(*tensors))

    def has_profiler(self) -> bool:
        return True

    def profile(self, tensors: list, warmup: int, repeat: int) -> list[RegionTiming]:
        """Every IR node timed by torch.profiler."""
        return profile_module(self.module, tensors, warmup, repeat, self.ops)

    def save(self, directory: str) -> None:
        """Nothing beyond the IR and weights, which the artifact saves."""


class EagerBackend(Backend):
    name = "eager"

    def available(self, target: Target) -> bool:
        return True

    def supports(self, node: Node) -> bool:
        return True

    def compile(self, graph: Graph, target: Target, example_inputs=None) -> EagerExecutable:
        return EagerExecutable(graph, target.device)

    def load(self, directory: str, graph: Graph, target: Target) -> EagerExecutable:
        return EagerExecutable(graph, target.device)
