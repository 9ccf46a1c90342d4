"""Activations written out by hand become the one ATen op they compute.

Matches: the largest run of at least MIN_OPS elementwise ops that reads one tensor x (plus literals
and scalar weights), whose intermediate values nothing else reads, and produces one tensor of x's
shape and dtype — e.g. GPT-2's
`0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))` — whose values, computed in float64
at PROBE_POINTS points over [-PROBE_RANGE, PROBE_RANGE] (and at 0, ±inf-free extremes), equal a
known activation's to within PROBE_RTOL. Produces: that activation's ATen op (`aten.gelu` with
approximate "none" or "tanh", `aten.silu`, `aten.sigmoid`, `aten.mish`, …) on x.

Why by value rather than by shape of the expression: the same function is written many ways
(x*x*x or pow(x, 3); 0.5*x*(1+t) or x*(0.5+0.5*t)); two different closed forms of these
analytic functions cannot agree to 1e-10 at 2001 points. Results change only by rounding (the
op and the written-out chain round differently in fp32), which the numerical tests bound.

Leaves alone: clusters that read two tensors, change shape or dtype, or match nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blade.ir.fused import topological
from blade.ir.graph import Graph, Node, TensorMeta, iter_refs, map_refs
from blade.ops.info import ELEMENTWISE
from blade.passes.manager import PassContext

aten = torch.ops.aten
MIN_OPS = 2
MAX_OPS = 24
PROBE_POINTS = 2001
PROBE_RANGE = 12.0
PROBE_RTOL = 1e-10

# name -> (the reference in float64, the ATen op and its extra arguments)
ACTIVATIONS = {
    "gelu": (lambda t: F.gelu(t), aten.gelu.default, (), {}),
    "gelu_tanh": (lambda t: F.gelu(t, approximate="tanh"), aten.gelu.default, (), {"approximate": "tanh"}),
    "silu": (F.silu, aten.silu.default, (), {}),
    "sigmoid": (torch.sigmoid, aten.sigmoid.default, (), {}),
    "mish": (F.mish, aten.mish.default, (), {}),
    "tanh": (torch.tanh, aten.tanh.default, (), {}),
}


def _is_elementwise(node: Node) -> bool:
    return node.op == "call" and node.target in ELEMENTWISE and isinstance(node.val, TensorMeta)


def _fixed(ref: Node) -> bool:
    """A reference a probe can evaluate as is: a 0-d or 1-element weight."""
    return ref.op == "constant" and isinstance(ref.val, TensorMeta) and all(s == 1 for s in ref.val.shape)


def grow_cluster(graph: Graph, x: Node) -> list[Node]:
    """The elementwise nodes computed from x alone (and literals, scalar weights), up to MAX_OPS."""
    cluster: set[Node] = set()
    frontier = [u for u in graph.users(x) if _is_elementwise(u)]
    changed = True
    while changed and len(cluster) < MAX_OPS:
        changed = False
        for node in list(frontier):
            if node in cluster:
                continue
            refs = list(iter_refs((node.args, node.kwargs)))
            if all(r is x or r in cluster or _fixed(r) for r in refs):
                cluster.add(node)
                frontier.extend(u for u in graph.users(node) if _is_elementwise(u) and u not in cluster)
                changed = True
    return topological(graph, cluster)


def _ancestors_within(out: Node, cluster: list[Node]) -> list[Node]:
    inside, keep, stack = set(cluster), {out}, [out]
    while stack:
        for ref in stack.pop().refs():
            if ref in inside and ref not in keep:
                keep.add(ref)
                stack.append(ref)
    return [n for n in cluster if n in keep]


def probe(graph: Graph, x: Node, members: list[Node], out: Node) -> torch.Tensor:
    """The cluster's output, computed in float64 on the probe points."""
    points = torch.linspace(-PROBE_RANGE, PROBE_RANGE, PROBE_POINTS, dtype=torch.float64)
    values: dict[Node, torch.Tensor] = {x: points}

    def value(ref: Node):
        if ref in values:
            return values[ref]
        return graph.constants[ref.name].to(torch.float64).reshape(())

    for node in members:
        args = map_refs(node.args, value)
        kwargs = map_refs(node.kwargs, value)
        values[node] = node.target(*args, **kwargs)
    return values[out]


def identify(graph: Graph, x: Node, members: list[Node], out: Node) -> str | None:
    try:
        got = probe(graph, x, members, out)
    except (RuntimeError, TypeError, ValueError):
        return None
    if got.dtype != torch.float64 or got.shape != (PROBE_POINTS,) or not torch.isfinite(got).all():
        return None
    points = torch.linspace(-PROBE_RANGE, PROBE_RANGE, PROBE_POINTS, dtype=torch.float64)
    for name, (reference, *_rest) in ACTIVATIONS.items():
        want = reference(points)
        if torch.allclose(got, want, rtol=PROBE_RTOL, atol=PROBE_RTOL):
            return name
    return None


def _candidates(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes
            if isinstance(n.val, TensorMeta) and n.val.dtype.is_floating_point
            and sum(1 for u in graph.users(n) if _is_elementwise(u)) >= 1]


def _closed(graph: Graph, members: list[Node], out: Node) -> bool:
    """Every member but `out` is read only inside `members` (replacing them loses nothing)."""
    inside = set(members)
    return not any(graph.is_output(m) or any(u not in inside for u in graph.users(m)) for m in members if m is not out)


def find_activation(graph: Graph, x: Node) -> tuple[str, list[Node], Node] | None:
    """The largest run of elementwise ops on x that computes a known activation."""
    cluster = grow_cluster(graph, x)
    for out in reversed(cluster):
        members = _ancestors_within(out, cluster)
        if len(members) < MIN_OPS or not _closed(graph, members, out):
            continue
        if not (isinstance(out.val, TensorMeta) and out.val.dtype == x.val.dtype and out.val.shape == x.val.shape):
            continue
        name = identify(graph, x, members, out)
        if name is not None:
            return name, members, out
    return None


def run(graph: Graph, ctx: PassContext) -> Graph:
    for x in _candidates(graph):
        found = find_activation(graph, x) if x in graph else None
        if found is None:
            continue
        name, members, out = found
        if not ctx.allows(out.name):
            continue
        _, target, extra_args, kwargs = ACTIVATIONS[name]
        new = graph.add_node(target, (x, *extra_args), dict(kwargs), dict(out.meta), name=name)
        graph.replace_all_uses(out, new)
        for node in reversed(members):
            graph.remove_node(node)
        ctx.count(f"activation:{name}")
        ctx.note(f"{new.name}: {len(members)} elementwise ops on {x.name} are {name}")
    return graph
