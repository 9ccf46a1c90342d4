"""Partitioning: split a graph into backend regions and PyTorch regions without creating cycles.

Each tensor-producing node is either supported by the backend or not. A node's phase is the
largest phase of its inputs, plus one where the support flips; nodes with the same (phase,
support) form one region. Every edge then runs to a later phase or stays inside a region, so
regions run in phase order and the condensed graph is acyclic (checked with networkx).

Scalar nodes (symbolic sizes and their arithmetic) belong to no region: each region that reads
one recomputes it from tensors, so no Python int ever crosses a region boundary.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import networkx as nx

from blade.errors import GraphError
from blade.ir.graph import Graph, Node, ScalarMeta, map_refs


@dataclass
class Region:
    """One run of nodes for one executor; `graph` is it as a standalone Graph."""

    index: int
    supported: bool
    nodes: list[Node]
    graph: Graph
    inputs: list[str] = field(default_factory=list)  # names in the parent graph, in graph.inputs order
    outputs: list[str] = field(default_factory=list)  # names in the parent graph, in graph.outputs order
    reason: str = ""  # why a PyTorch region could not go to the backend


def is_scalar(node: Node) -> bool:
    """Size arithmetic and runtime asserts (which produce nothing): recomputed where read, never a region."""
    return node.op == "call" and (isinstance(node.val, ScalarMeta) or node.val is None)


def _support(graph: Graph, supports: Callable[[Node], bool]) -> dict[Node, bool]:
    flags: dict[Node, bool] = {}
    for node in graph.call_nodes:
        if is_scalar(node):
            continue
        if node.target is operator.getitem:  # a tuple never crosses a boundary: follow the producer
            flags[node] = flags[node.args[0]]
        else:
            flags[node] = bool(supports(node))
    return flags


def _tensor_deps(node: Node, graph: Graph, flags: dict[Node, bool]) -> set[Node]:
    """The region nodes `node` reads: directly, or through the sizes it reads (recomputed from tensors)."""
    deps = set()
    for pred in graph.nx.predecessors(node):
        if pred in flags:
            deps.add(pred)
        elif is_scalar(pred):
            deps |= {t for s in _scalar_closure(pred, graph) for t in graph.nx.predecessors(s) if t in flags}
    return deps


def _phases(graph: Graph, flags: dict[Node, bool], deps: dict[Node, set[Node]]) -> dict[Node, int]:
    phase: dict[Node, int] = {}
    for node in graph.nodes:
        if node in flags:
            phase[node] = max((phase[p] + (flags[p] != flags[node]) for p in deps[node]), default=0)
    return phase


def _scalar_closure(node: Node, graph: Graph) -> list[Node]:
    """A scalar node with every scalar node it needs, in topological order."""
    needed, stack = {node}, [node]
    while stack:
        for pred in graph.nx.predecessors(stack.pop()):
            if is_scalar(pred) and pred not in needed:
                needed.add(pred)
                stack.append(pred)
    return [n for n in graph.nodes if n in needed]


def build_region(parent: Graph, index: int, supported: bool, nodes: list[Node], name: str,
                 outputs: list[Node] | None = None) -> Region:
    """The nodes as a standalone Graph: outside tensors become inputs, read scalars are recomputed.

    Its outputs are `outputs`, or by default every member read outside the region or returned.
    """
    members = set(nodes)
    scalars = {s for n in nodes for p in parent.nx.predecessors(n) if is_scalar(p) for s in _scalar_closure(p, parent)}
    body = [n for n in parent.nodes if n in members or n in scalars]
    sub = Graph(name)
    sub.dims = dict(parent.dims)
    mapping: dict[Node, Node] = {}
    inputs: list[str] = []

    def ref(node: Node) -> Node:
        if node not in mapping:
            if node.op == "constant":
                mapping[node] = sub.add_constant(node.name, parent.constants[node.name], node.target)
            else:
                mapping[node] = sub.add_input(node.name, node.val)
                inputs.append(node.name)
        return mapping[node]

    for node in body:
        args, kwargs = map_refs(node.args, ref), map_refs(node.kwargs, ref)
        mapping[node] = sub.add_node(node.target, args, kwargs, dict(node.meta), name=node.name)
    if outputs is None:
        outside = {n for n in nodes if any(u not in members for u in parent.users(n)) or parent.is_output(n)}
        outputs = [n for n in nodes if n in outside and not isinstance(n.val, tuple)]
    sub.outputs = [mapping[n] for n in outputs]
    order = {node.name: i for i, node in enumerate(parent.nodes)}
    order.update({node.name: i - len(parent.inputs) for i, node in enumerate(parent.inputs)})
    inputs.sort(key=order.__getitem__)  # the parent's calling order, for readable ONNX signatures
    sub.inputs.sort(key=lambda node: order[node.name])
    return Region(index, supported, list(nodes), sub, inputs, [n.name for n in outputs])


def partition(graph: Graph, supports: Callable[[Node], bool]) -> list[Region]:
    """Regions in an order that runs correctly; graph outputs that are scalars get a final region."""
    flags = _support(graph, supports)
    deps = {node: _tensor_deps(node, graph, flags) for node in flags}
    phase = _phases(graph, flags, deps)
    groups: dict[tuple[int, bool], list[Node]] = {}
    for node in graph.nodes:
        if node in flags:
            groups.setdefault((phase[node], flags[node]), []).append(node)
    ordered = sorted(groups.items(), key=lambda item: (item[0][0], not item[0][1]))
    _check_acyclic([nodes for _, nodes in ordered], deps, graph.name)
    regions = [build_region(graph, i, supported, nodes, f"{graph.name}_region{i}")
               for i, ((_, supported), nodes) in enumerate(ordered)]
    scalar_outputs = [o for o in graph.output_nodes if is_scalar(o)]
    if scalar_outputs:
        closure = list(dict.fromkeys(n for o in scalar_outputs for n in _scalar_closure(o, graph)))
        sizes = build_region(graph, len(regions), False, closure, f"{graph.name}_sizes", scalar_outputs)
        sizes.reason = "returns Python numbers (sizes), computed in PyTorch"
        regions.append(sizes)
    return regions


def _check_acyclic(groups: list[list[Node]], deps: dict[Node, set[Node]], name: str) -> None:
    owner = {node: i for i, nodes in enumerate(groups) for node in nodes}
    condensed = nx.DiGraph()
    condensed.add_nodes_from(range(len(groups)))
    condensed.add_edges_from((owner[u], owner[v]) for v in owner for u in deps[v] if owner[u] != owner[v])
    if not nx.is_directed_acyclic_graph(condensed) or any(u > v for u, v in condensed.edges):
        raise GraphError(f"partition of {name} would create a cycle between regions")
