"""Per-node times of a graph run by PyTorch, from torch.profiler: every IR node is its own region."""
from __future__ import annotations

import statistics
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, record_function

from blade.backends.base import RegionTiming
from blade.ir.graph import format_target

_PREFIX = "blade::node::"


class _Annotated(torch.fx.Interpreter):
    """Runs the module node by node, each call inside a profiler range named after its IR node."""

    def run_node(self, n: torch.fx.Node):
        if n.op != "call_function":
            return super().run_node(n)
        with record_function(_PREFIX + n.name):
            return super().run_node(n)


def profile_module(module: torch.fx.GraphModule, tensors: list[torch.Tensor], warmup: int, repeat: int,
                   ops: dict[str, str] | None = None) -> list[RegionTiming]:
    """Median time per call of every call node; on CUDA the device time of the kernels it launched. `ops` names
    each node's op as the IR has it (the module may call a faster function for it)."""
    ops = ops or {}
    device = "cuda" if any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor)) else "cpu"
    interpreter = _Annotated(module)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    # warm-up runs inside the profiler too, then dropped: its first ranges pay for starting it up
    with torch.no_grad(), torch.profiler.profile(activities=activities) as recorded:
        for _ in range(warmup + repeat):
            interpreter.run(*tensors)
        if device == "cuda":
            torch.cuda.synchronize()
    samples: dict[str, list[float]] = defaultdict(list)
    for event in recorded.events():
        # the CPU-side range only: on CUDA, kineto also reports each range as a GPU annotation (its span)
        if event.name.startswith(_PREFIX) and event.device_type == DeviceType.CPU:
            micros = event.device_time_total if device == "cuda" else event.cpu_time_total
            samples[event.name.removeprefix(_PREFIX)].append(micros / 1e6)
    return [RegionTiming(n.name, "torch", (ops.get(n.name) or format_target(n.target),), (n.name,),
                         statistics.median(samples[n.name][warmup:] or samples[n.name]))
            for n in module.graph.nodes if n.name in samples]
