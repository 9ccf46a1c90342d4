"""Fused regions: one IR node that stands for a subgraph a backend runs as one unit (one kernel).

A fused node is a call whose target is a `FusedRegion`: the region's `kind` (what a code generator
needs: "loop" — elementwise/broadcast; "reduction" — a row reduction with its prologue/epilogue;
"matmul_epilogue" — a matmul with its bias, activation, residual), its `pattern` (what it computes
when it has a name a backend knows, e.g. "skip_layer_norm", "bias_gelu"; "loop" otherwise), named
`attrs` (eps, approximate, …) and its `body`: a blade Graph whose inputs are the node's arguments,
in order, and whose outputs are the node's outputs (one tensor, or a tuple read through getitem).
Calling the region runs its body in PyTorch: that is its meaning, and the eager backend's kernel.
"""
from __future__ import annotations

import operator
from typing import Any, Iterable

from blade.errors import GraphError
from blade.ir.graph import Graph, Node, ScalarMeta, TensorMeta, map_refs

KINDS = ("loop", "reduction", "matmul_epilogue")


class FusedRegion:
    """The target of a fused node: kind, pattern, attrs and the body subgraph."""

    __module__ = "blade.ir.fused"

    def __init__(self, kind: str, pattern: str, body: Graph, attrs: dict[str, Any] | None = None):
        if kind not in KINDS:
            raise GraphError(f"fused region kind {kind!r} is not one of {KINDS}")
        self.kind = kind
        self.pattern = pattern
        self.body = body
        self.attrs = dict(attrs or {})
        self._module = None

    @property
    def __name__(self) -> str:  # noqa: A003 — fx and format_target name call targets by it
        return f"fused_{self.pattern}"

    @property
    def multiple_outputs(self) -> bool:
        return len(self.body.outputs) > 1

    def module(self):
        """The body as an fx GraphModule, built once (build it before torch.compile traces a call: building
        inside the trace would break its graph at every region)."""
        if self._module is None:
            self._module = self.body.to_fx()
        return self._module

    def __call__(self, *tensors):
        out = self.module()(*tensors)
        return tuple(out) if self.multiple_outputs else out[0]

    def describe(self, most: int = 6) -> str:
        """fused.<kind>.<pattern>[op+op+…]: how the graph listing shows the node."""
        ops = [_short(n.target) for n in self.body.call_nodes]
        shown = "+".join(ops[:most]) + ("+…" if len(ops) > most else "")
        return f"fused.{self.kind}.{self.pattern}[{shown}]"

    def __repr__(self) -> str:
        return f"FusedRegion({self.kind}, {self.pattern}, {len(self.body.call_nodes)} ops)"


def _short(target) -> str:
    schema = getattr(target, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else getattr(target, "__name__", str(target))


def is_fused(node: Node) -> bool:
    return node.op == "call" and isinstance(node.target, FusedRegion)


def region_of(node: Node) -> FusedRegion | None:
    return node.target if is_fused(node) else None


def calls_within(graph: Graph) -> list[Node]:
    """Every call node, in order, with a fused region's body calls in place of the region."""
    return [inner for node in graph.call_nodes
            for inner in (node.target.body.call_nodes if is_fused(node) else [node])]


def verify_regions(graph: Graph) -> None:
    """Every fused node's body verifies, holds no fused node, and takes the node's arguments."""
    for node in graph.call_nodes:
        if not is_fused(node):
            continue
        body = node.target.body
        if len(body.inputs) != len(node.args) or node.kwargs:
            raise GraphError(f"fused node {node.name}: {len(node.args)} arguments for a body with "
                             f"{len(body.inputs)} inputs")
        nested = [m.name for m in body.call_nodes if is_fused(m)]
        if nested:
            raise GraphError(f"fused node {node.name} holds fused nodes {nested}")
        try:
            body.verify()
        except GraphError as exc:
            raise GraphError(f"fused node {node.name}: {exc}") from exc


def creates_cycle(graph: Graph, members: set[Node]) -> bool:
    """Whether contracting `members` into one node would make a cycle: a path that leaves the set
    comes back into it (some node the region feeds reaches a member; the last step before the first
    member it meets leaves a node the region reads)."""
    feeds = {u for m in members for u in graph.nx.successors(m)} - members
    reads = {p for m in members for p in graph.nx.predecessors(m)} - members
    if not feeds or not reads:
        return False
    return graph.reaches(feeds, members)


def external_inputs(members: list[Node]) -> list[Node]:
    """The nodes outside `members` that members read, in first-use order."""
    inside = set(members)
    return list(dict.fromkeys(ref for m in members for ref in m.refs() if ref not in inside))


def region_outputs(graph: Graph, members: list[Node]) -> list[Node]:
    """Members read outside the region or returned by the graph, in topological order."""
    inside = set(members)
    return [m for m in members if graph.is_output(m) or any(u not in inside for u in graph.users(m))]


def fusable(graph: Graph, members: Iterable[Node]) -> str | None:
    """None when `members` can become one fused node, else why not."""
    members = list(members)
    for m in members:
        if m.op != "call" or is_fused(m):
            return f"{m.name} is not a plain call"
        if not isinstance(m.val, TensorMeta):
            return f"{m.name} does not produce one tensor"
    for ref in external_inputs(members):
        if not isinstance(ref.val, (TensorMeta, ScalarMeta)):
            return f"{ref.name} is neither a tensor nor a number"
    if creates_cycle(graph, set(members)):
        return "it would create a cycle"
    return None


def fuse(graph: Graph, members: list[Node], kind: str, pattern: str, attrs: dict | None = None) -> Node:
    """Replace `members` (call nodes, in topological order) by one fused node and return it; raise
    GraphError when they are not fusable."""
    why = fusable(graph, members)
    if why:
        raise GraphError(f"cannot fuse {[m.name for m in members]} as {pattern}: {why}")
    inputs = external_inputs(members)
    outputs = region_outputs(graph, members)
    attrs = dict(attrs or {})
    body = Graph(pattern)
    body.dims = dict(graph.dims)
    mapping: dict[Node, Node] = {}
    for ref in inputs:
        mapping[ref] = body.add_input(ref.name, ref.val)
    for m in members:
        args = map_refs(m.args, mapping.__getitem__)
        kwargs = map_refs(m.kwargs, mapping.__getitem__)
        mapping[m] = body.add_node(m.target, args, kwargs, dict(m.meta), name=m.name)
    body.outputs = [mapping[o] for o in outputs]
    region = FusedRegion(kind, pattern, body, attrs)
    source = next((m.meta["source"] for m in reversed(members) if m.meta.get("source")), None)
    meta = {"val": outputs[0].val if len(outputs) == 1 else tuple(o.val for o in outputs)}
    if source:
        meta["source"] = source
    fused = graph.add_node(region, inputs, {}, meta, name=f"fused_{pattern}")
    if len(outputs) == 1:
        graph.replace_all_uses(outputs[0], fused)
    else:
        for i, out in enumerate(outputs):
            item = graph.add_node(operator.getitem, (fused, i), {}, {"val": out.val}, name=f"{fused.name}_{i}")
            graph.replace_all_uses(out, item)
    for m in reversed(members):
        graph.remove_node(m)
    return fused


def topological(graph: Graph, members: Iterable[Node]) -> list[Node]:
    """`members` in the graph's topological order."""
    members = set(members)
    if len(members) < 2:
        return list(members)
    return graph.in_order(members)
