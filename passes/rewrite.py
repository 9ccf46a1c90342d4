"""Match, then commit: a rewrite is planned from a read-only look at the graph, then applied in one step.

A pass's matcher returns a `Plan` (or None to decline) without touching the graph: the nodes the
rewrite adds (`New`, whose arguments may be graph nodes or other `New`s), the values it reroutes to
them, the arguments it changes on nodes it keeps, and optionally the members it fuses into one
region. Only `Plan.commit` mutates, after the pass has asked `ctx.allows(plan.site)`; a plan that
is never committed leaves nothing behind, so no failed match needs a dead-code sweep.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blade.ir.fused import fuse
from blade.ir.graph import Graph, Node, map_refs
from blade.ops.info import infer_meta


class New:
    """A node a plan will add: `target(*args, **kwargs)`; its meta (`val`) comes from the op's meta function."""

    def __init__(self, target, args: tuple, kwargs: dict | None = None, *, name: str | None = None):
        self.target, self.args, self.kwargs, self.name = target, tuple(args), dict(kwargs or {}), name
        stand_ins = lambda x: Node(x.name or "new", "call", x.target, meta={"val": x.val})  # noqa: E731
        self.val = infer_meta(target, _replaced(self.args, stand_ins), _replaced(self.kwargs, stand_ins))

    def __repr__(self) -> str:
        return f"New({self.name or self.target})"


def _refs(obj) -> list[New]:
    """The `New`s that appear in a nested argument structure."""
    found: list[New] = []

    def walk(x):
        if isinstance(x, New):
            found.append(x)
        elif isinstance(x, (tuple, list)):
            for item in x:
                walk(item)
        elif isinstance(x, dict):
            for item in x.values():
                walk(item)
    walk(obj)
    return found


def _replaced(obj, fn):
    """`obj` with every `New` in it replaced by fn(new)."""
    if isinstance(obj, New):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_replaced(x, fn) for x in obj)
    if isinstance(obj, list):
        return [_replaced(x, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: _replaced(v, fn) for k, v in obj.items()}
    return obj


def _resolve(obj, made: dict[New, Node]):
    return _replaced(obj, made.__getitem__)


@dataclass
class Region:
    """Members (graph nodes or `New`s, in topological order) to fuse into one region at commit."""

    members: list
    kind: str
    pattern: str
    attrs: dict = field(default_factory=dict)


@dataclass
class Plan:
    """One rewrite, anchored on the node named `site`: what it changes, not yet applied."""

    site: str
    reroute: list[tuple[Node, Any]] = field(default_factory=list)  # (old, new): old's readers read new
    rewire: list[tuple[Node, tuple]] = field(default_factory=list)  # (kept node, its new args)
    region: Region | None = None
    description: str = ""

    def commit(self, graph: Graph) -> dict[New, Node]:
        """Apply the plan: change the arguments, add its nodes, reroute, fuse; returns what each New became."""
        made: dict[New, Node] = {}
        for node, args in self.rewire:
            graph.set_args(node, args)
        for _, new in self.reroute:
            _materialize(graph, new, made)
        for old, new in self.reroute:
            _reroute(graph, old, _resolve(new, made), set(made.values()))
        if self.region is not None:
            for member in self.region.members:
                _materialize(graph, member, made)
            members = [_resolve(m, made) for m in self.region.members]
            fuse(graph, members, self.region.kind, self.region.pattern, self.region.attrs)
        return made


def _reroute(graph: Graph, old: Node, new: Node, added: set[Node]) -> None:
    """Point old's readers and the graph's outputs at new, except the nodes this plan added (which may read old)."""
    swap = lambda n: new if n is old else n  # noqa: E731
    for user in graph.users(old):
        if user is not new and user not in added:
            graph.set_args(user, map_refs(user.args, swap), map_refs(user.kwargs, swap))
    graph.outputs[:] = [swap(o) for o in graph.outputs]


def _materialize(graph: Graph, value, made: dict[New, Node]) -> None:
    """Add every `New` that `value` is or reads, dependencies first."""
    for new in _refs(value):
        if new in made:
            continue
        for dep in _refs((new.args, new.kwargs)):
            _materialize(graph, dep, made)
        args, kwargs = _resolve(new.args, made), _resolve(new.kwargs, made)
        made[new] = graph.add_node(new.target, args, kwargs, {"val": new.val}, name=new.name)



def commit_region_plans(graph: Graph, ctx, kind: str, match) -> Graph:
    """Each call node's plan from `match(graph, node)` (None: no match), committed where the context allows it,
    counted as a region of `kind` by its pattern."""
    for node in graph.call_nodes:
        if node not in graph:
            continue
        plan = match(graph, node)
        if plan is not None and ctx.allows(plan.site):
            plan.commit(graph)
            ctx.count(f"{kind}:{plan.region.pattern}")
            ctx.count("regions")
            ctx.count("ops_in_regions", len(plan.region.members))
    return graph
