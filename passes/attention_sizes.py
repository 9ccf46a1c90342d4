"""Evaluating what depends on sizes alone: a mask or scale built from dims and constants, at sample sizes.

The attention pass asks this to read a scale such as `1 / sqrt(head_dim)` computed from a size, and to
prove a mask causal (attention_causal.py). Nodes that read input data, or whose ancestry is larger than
SIZE_ONLY_MAX_NODES, are not size-only; nothing here touches the graph.
"""
from __future__ import annotations

from typing import Any

import torch

from blade.ir.graph import Graph, Node, ScalarMeta, TensorMeta, map_refs
from blade.ir.shapes import evaluate, is_static

aten = torch.ops.aten

SIZE_ONLY_MAX_NODES = 64
# A size-only mask is evaluated at these sizes and at the largest its dims may take, up to
# CAUSAL_CHECK_MAX; a mask whose seq may exceed that stays explicit (a sliding window wider than
# every size checked would look causal). See attention_causal.EXTENT_ARGS for why the largest size settles it.
SIZE_SAMPLES = (7, 12)
CAUSAL_CHECK_MAX = 8192


class SizeOnly:
    """Evaluates nodes that depend only on dynamic sizes and constants, at a few sample sizes."""

    def __init__(self, graph: Graph):
        self.graph = graph
        # each dim a different value (a mask mixing two dims must not look like one of them)
        self.samples = [{name: _clamp(value + 2 * i, rng) for i, (name, rng) in enumerate(sorted(graph.dims.items()))}
                        for value in (*SIZE_SAMPLES, CAUSAL_CHECK_MAX)]
        self._memo: dict[tuple[str, int], Any] = {}

    def values(self, node: Node) -> list | None:
        """The node's value at each sample, or None when it reads input data or is too big to evaluate."""
        if ancestors(self.graph, node, SIZE_ONLY_MAX_NODES) is None:
            return None
        try:
            return [self._value(node, i) for i in range(len(self.samples))]
        except _NotSizeOnly:
            return None
        except Exception:  # noqa: BLE001 - an op that cannot run on sample sizes is simply not size-only
            return None

    def _value(self, node: Node, sample: int):
        key = (node.name, sample)
        if key not in self._memo:
            self._memo[key] = self._compute(node, sample)
        return self._memo[key]

    def _compute(self, node: Node, sample: int):
        if node.op == "input":
            raise _NotSizeOnly
        if node.op == "constant":
            tensor = self.graph.constants[node.name]
            if tensor.numel() > 4 * 1024 * 1024:
                raise _NotSizeOnly
            return tensor.cpu()
        if node.target is aten.sym_size.int and isinstance(node.val, ScalarMeta) and node.val.value is not None:
            return evaluate(node.val.value, self.samples[sample])
        if isinstance(node.val, ScalarMeta) and node.val.value is not None and is_static(node.val.value):
            return node.val.value
        resolve = lambda n: self._value(n, sample)  # noqa: E731
        args, kwargs = map_refs(node.args, resolve), map_refs(node.kwargs, resolve)
        if "device" in kwargs:  # a mask built on the GPU is evaluated on the CPU
            kwargs["device"] = torch.device("cpu")
        return node.target(*args, **kwargs)


class _NotSizeOnly(Exception):
    pass


def _clamp(value: int, rng) -> int:
    value = value if rng.min is None else max(value, rng.min)
    return value if rng.max is None else min(value, rng.max)


def ancestors(graph: Graph, node: Node, limit: int) -> set | None:
    seen, stack = {node}, [node]
    while stack:
        for pred in graph.nx.predecessors(stack.pop()):
            if pred not in seen:
                seen.add(pred)
                if len(seen) > limit:
                    return None
                stack.append(pred)
    return seen


def scalar_of(sizes: SizeOnly, arg) -> float | None:
    """A number, or a one-element tensor that depends on sizes alone and is the same at every sample."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    if isinstance(arg, Node) and isinstance(arg.val, TensorMeta) and all(
            is_static(s) and s == 1 for s in arg.val.shape):
        values = sizes.values(arg)
        if values:
            floats = {float(v.reshape(())) if isinstance(v, torch.Tensor) else float(v) for v in values}
            if len(floats) == 1:
                return floats.pop()
    return None
