"""The blade IR: a networkx DiGraph of operations with explicit inputs, constants and outputs."""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import networkx as nx
import torch

from blade.errors import GraphError
from blade.ir.shapes import DimRange, Shape, Size, dim_symbol, format_shape


_LIFT = 2.0 ** -20  # how far a mutation lifts a node's level above a new source's: exact in a float


@dataclass(frozen=True)
class TensorMeta:
    """Shape (ints and sympy expressions), dtype and device type of one tensor value."""

    shape: Shape
    dtype: torch.dtype
    device: str = "cpu"

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype)}{format_shape(self.shape)}"


@dataclass(frozen=True)
class ScalarMeta:
    """A Python scalar value (a symbolic size, a flag); `value` is known when static."""

    type: type
    value: Size | float | bool | None = None

    def __str__(self) -> str:
        shown = "?" if self.value is None else str(self.value)
        return f"{self.type.__name__}({shown})"


# The one spelling of dtypes in blade: the IR's text, precision options, reports and peak tables.
DTYPE_NAMES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "int64", torch.int32: "int32", torch.int16: "int16", torch.int8: "int8",
    torch.uint8: "uint8", torch.bool: "bool", torch.complex64: "complex64", torch.float8_e4m3fn: "fp8_e4m3",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """fp32, bf16, int8, …; torch's own name for a dtype the table does not list."""
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def dtype_named(name: str) -> torch.dtype:
    """The dtype dtype_name spells `name` (KeyError for a name it does not give)."""
    return _DTYPES_BY_NAME[name]


def format_meta(val) -> str:
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(format_meta(v) for v in val) + ")"
    return "none" if val is None else str(val)


def format_target(target) -> str:
    """aten.linear.default for an op overload; what describe() says for a target that has it (a
    fused region); module.name for a Python function."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if callable(getattr(target, "describe", None)):
        return target.describe()
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    return f"{module.replace('_operator', 'operator')}.{name}" if module else name


class Node:
    """One operation: an input, a constant (weight/buffer) or a call of `target` on `args`/`kwargs`.

    `args`/`kwargs` hold literals and references to other Nodes; `meta["val"]` is the TensorMeta,
    ScalarMeta or tuple of them describing each output.
    """

    __slots__ = ("name", "op", "target", "args", "kwargs", "meta")

    def __init__(self, name: str, op: str, target: Any, args=(), kwargs=None, meta=None):
        self.name = name
        self.op = op  # "input" | "constant" | "call"
        self.target = target
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.meta = dict(meta or {})

    @property
    def val(self):
        return self.meta.get("val")

    @property
    def shape(self) -> Shape:
        return self._tensor_meta().shape

    @property
    def dtype(self) -> torch.dtype:
        return self._tensor_meta().dtype

    def _tensor_meta(self) -> TensorMeta:
        if not isinstance(self.val, TensorMeta):
            raise GraphError(f"node {self.name} does not produce a single tensor (meta: {format_meta(self.val)})")
        return self.val

    def refs(self) -> list["Node"]:
        """The nodes this node reads, in argument order, each once."""
        return list(dict.fromkeys(iter_refs((self.args, self.kwargs))))

    def __repr__(self) -> str:
        return f"%{self.name}"


def _leaves(obj, kind: type) -> Iterator:
    """Every instance of `kind` inside a nest of tuples, lists, dicts and slices (node arguments)."""
    if isinstance(obj, kind):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _leaves(item, kind)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _leaves(item, kind)
    elif isinstance(obj, slice):
        yield from _leaves((obj.start, obj.stop, obj.step), kind)


def _mapped(obj, kind: type, fn: Callable):
    """A copy of a nest of tuples, lists, dicts and slices with every instance of `kind` replaced by fn(it)."""
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_mapped(item, kind, fn) for item in obj)
    if isinstance(obj, list):
        return [_mapped(item, kind, fn) for item in obj]
    if isinstance(obj, dict):
        return {key: _mapped(item, kind, fn) for key, item in obj.items()}
    if isinstance(obj, slice):
        return slice(*(_mapped(item, kind, fn) for item in (obj.start, obj.stop, obj.step)))
    return obj


def iter_refs(obj) -> Iterator[Node]:
    """Every Node referenced inside a nest of tuples, lists and dicts."""
    return _leaves(obj, Node)


def map_refs(obj, fn: Callable[[Node], Any]):
    """A copy of a nest of tuples, lists and dicts with every Node replaced by fn(node)."""
    return _mapped(obj, Node, fn)


def iter_graphs(obj) -> Iterator["Graph"]:
    """Every nested Graph (a branch of torch.cond, the body of a loop) inside a nest of node arguments."""
    return _leaves(obj, Graph)


def map_graphs(obj, fn: Callable[["Graph"], "Graph"]):
    """A copy of a nest of node arguments with every nested Graph replaced by fn(graph)."""
    return _mapped(obj, Graph, fn)


def _slot_paths(args, kwargs) -> Iterator[tuple[Node, str]]:
    def walk(obj, path):
        if isinstance(obj, Node):
            yield obj, path
        elif isinstance(obj, (tuple, list)):
            for i, item in enumerate(obj):
                yield from walk(item, f"{path}[{i}]")
        elif isinstance(obj, dict):
            for key, item in obj.items():
                yield from walk(item, f"{path}.{key}" if path else str(key))
    for i, arg in enumerate(args):
        yield from walk(arg, f"args[{i}]")
    for key, arg in kwargs.items():
        yield from walk(arg, f"kwargs.{key}")


class Graph:
    """One networkx.DiGraph of Nodes (edge u→v: v reads u) with ordered inputs, constants, outputs.

    Mutate through the methods here so that edges always follow the arguments; `verify()` checks
    the invariants. `nodes` lists the nodes in a stable topological order.

    A program that mutates stays a pure graph: the last len(mutations) outputs are the new values of the
    inputs `mutations` names, which the caller writes back after the call. The inputs named in `state`
    (buffers the model mutates) come last and are fed from those tensors, which the compiled model owns.
    """

    def __init__(self, name: str = "graph"):
        self.name = name
        self.nx = nx.DiGraph()
        self.inputs: list[Node] = []
        self.constants: dict[str, torch.Tensor] = {}  # constant node name -> tensor
        self.outputs: list[Any] = []  # Nodes or literals, in the order the model returns them
        self.dims: dict[str, DimRange] = {}
        self.mutations: list[str] = []  # input written back by each trailing output, in output order
        self.state: dict[str, torch.Tensor] = {}  # state input name -> its current value (mutated buffers)
        self.returns_tuple = True  # False: a nested graph that returns its one output bare (a loop's condition)
        self._by_name: dict[str, Node] = {}
        self._rank: dict[Node, int] = {}
        self._counter = itertools.count()
        self._order_cache: list[Node] | None = None
        self._position: dict[Node, int] = {}  # index in self._order_cache
        # A topological numbering kept up to date by every mutation (level[u] < level[v] along each edge),
        # so that reachability questions look only between two levels instead of at the whole graph.
        self._level: dict[Node, float] = {}
        self._levels_hold = True  # False once a mutation made a cycle (verify() reports it)

    # -- reading -----------------------------------------------------------------------------
    @property
    def nodes(self) -> list[Node]:
        """All nodes in topological order (ties broken by insertion order)."""
        return list(self._order())

    def _order(self) -> list[Node]:
        if self._order_cache is None:
            self._order_cache = list(nx.lexicographical_topological_sort(self.nx, key=self._rank.__getitem__))
            self._position = {node: i for i, node in enumerate(self._order_cache)}
        return self._order_cache

    @property
    def call_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "call"]

    @property
    def constant_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "constant"]

    @property
    def output_nodes(self) -> list[Node]:
        return [o for o in self.outputs if isinstance(o, Node)]

    @property
    def user_inputs(self) -> list[Node]:
        """The inputs a caller passes (graph.inputs without the state the compiled model feeds itself)."""
        return [n for n in self.inputs if n.name not in self.state]

    @property
    def user_output_count(self) -> int:
        """How many outputs the caller gets (the rest are written back into mutated inputs)."""
        return len(self.outputs) - len(self.mutations)

    def state_values(self) -> list[torch.Tensor]:
        """The state inputs' current tensors, in input order (what follows the user's tensors in a call)."""
        return [self.state[n.name] for n in self.inputs if n.name in self.state]

    def nested(self) -> list[tuple[Node, "Graph"]]:
        """(node, graph) for every graph a node of this one holds as an argument (torch.cond's branches, a loop's
        body), in node order; nested graphs share the dims of the graph that holds them."""
        return [(node, sub) for node in self.call_nodes for sub in iter_graphs((node.args, node.kwargs))]

    def output_dtypes(self) -> list:
        """The dtype each output declares (None for a literal or a non-tensor value), in output order."""
        return [getattr(getattr(o, "val", None), "dtype", None) if isinstance(o, Node) else None for o in self.outputs]

    @property
    def symbols(self) -> dict:
        return {name: dim_symbol(name) for name in self.dims}

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def __contains__(self, node) -> bool:
        return isinstance(node, Node) and self._by_name.get(node.name) is node

    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise GraphError(f"graph {self.name} has no node named {name!r}") from None

    def users(self, node: Node) -> list[Node]:
        return sorted(self.nx.successors(node), key=self._rank.__getitem__)

    def is_output(self, node: Node) -> bool:
        return any(o is node for o in self.outputs)

    def in_order(self, nodes: Iterable[Node]) -> list[Node]:
        """Those of `nodes` that belong to this graph, in the order of `graph.nodes`."""
        members = {n for n in nodes if n in self}
        if self._order_cache is None:  # a rewrite since the last sort: sort only these if that is exact
            local = self._local_order(members)
            if local is not None:
                return local
        self._order()
        return sorted(members, key=self._position.__getitem__)

    def _local_order(self, members: set[Node]) -> list[Node] | None:
        """`members` in the order `nodes` gives them, found from their own edges and ranks; None when a node
        outside them could change it.

        `nodes` takes, step by step, the lowest-ranked node whose inputs are all taken. Once every outside
        input of the members is taken, the members' order follows from their own edges and ranks alone. An
        outside input is surely taken before every member when it feeds every member that reads no other
        member (they all wait for it), or when it reads nothing and ranks below every member (the walk
        takes it before any of them)."""
        if len(members) < 2:
            return list(members)
        pred, succ, rank = self.nx._pred, self.nx._succ, self._rank
        inside = {m: sum(1 for p in pred[m] if p in members) for m in members}
        roots = [m for m, n in inside.items() if n == 0]
        feeds_roots: dict[Node, int] = {}
        for root in roots:
            for p in pred[root]:
                feeds_roots[p] = feeds_roots.get(p, 0) + 1
        lowest = min(rank[m] for m in members)
        for m in members:
            for p in pred[m]:
                if p not in members and feeds_roots.get(p) != len(roots) and (pred[p] or rank[p] > lowest):
                    return None
        ready = [(rank[m], m) for m in roots]  # ranks are unique: the nodes are never compared
        heapq.heapify(ready)
        order = []
        while ready:
            node = heapq.heappop(ready)[1]
            order.append(node)
            for user in succ[node]:
                if user in inside:
                    inside[user] -= 1
                    if inside[user] == 0:
                        heapq.heappush(ready, (rank[user], user))
        return order

    def reaches(self, sources: Iterable[Node], targets: Iterable[Node]) -> bool:
        """Whether some node of `targets` is one of `sources` or downstream of one."""
        targets = set(targets)
        if not targets:
            return False
        # a node at or above the highest target's level reaches no target
        horizon = max(self._level.get(t, math.inf) for t in targets) if self._levels_hold else math.inf
        seen, stack = set(), list(sources)
        while stack:
            node = stack.pop()
            if node in targets:
                return True
            if node in seen or self._level.get(node, -math.inf) >= horizon:
                continue
            seen.add(node)
            stack.extend(self.nx.successors(node))
        return False

    def downstream(self, nodes: Iterable[Node]) -> set[Node]:
        """Every node that reads one of `nodes`, directly or through others."""
        seen: set[Node] = set()
        stack = [user for node in nodes for user in self.nx.successors(node)]
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(self.nx.successors(node))
        return seen

    # -- building ----------------------------------------------------------------------------
    def _unique_name(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c == "_" else "_" for c in hint) or "node"
        if base[0].isdigit():
            base = "_" + base
        name, i = base, 1
        while name in self._by_name:
            name, i = f"{base}_{i}", i + 1
        return name

    def _insert(self, node: Node) -> Node:
        if node.name in self._by_name:
            raise GraphError(f"graph {self.name} already has a node named {node.name!r}")
        self._by_name[node.name] = node
        self._rank[node] = next(self._counter)
        self.nx.add_node(node)
        self._connect(node)
        return node

    def _connect(self, node: Node) -> None:
        for src, slot in _slot_paths(node.args, node.kwargs):
            if self.nx.has_edge(src, node):
                self.nx.edges[src, node]["slots"].append(slot)
            else:
                self.nx.add_edge(src, node, slots=[slot])
        self._order_cache = None
        sources = list(self.nx.predecessors(node))
        floor = max((self._level[src] for src in sources if src in self._level), default=-1.0)
        if node not in self._level:
            self._level[node] = floor + 1.0
        elif floor >= self._level[node]:
            self._raise_level(node, floor, set(sources))

    def _raise_level(self, node: Node, floor: float, sources: set[Node]) -> None:
        """Lift `node` above `floor` and whatever it feeds above it, as little as needed: a small step,
        so that the lift stops at the first reader whose level is already higher."""
        stack = [(node, floor)]
        while stack:
            current, below = stack.pop()
            if self._level.get(current, math.inf) > below:
                continue
            if current in sources:  # the new edges closed a cycle: no numbering is topological any more
                self._levels_hold = False
                return
            self._level[current] = level = below + _LIFT
            stack.extend((user, level) for user in self.nx.successors(current))

    def add_input(self, name: str, meta: TensorMeta) -> Node:
        node = self._insert(Node(self._unique_name(name), "input", None, meta={"val": meta}))
        self.inputs.append(node)
        return node

    def add_constant(self, name: str, tensor: torch.Tensor, source: str | None = None) -> Node:
        """A weight or buffer; `source` is its name in the original module (e.g. encoder.0.weight)."""
        meta = {"val": TensorMeta(tuple(tensor.shape), tensor.dtype, tensor.device.type)}
        node = self._insert(Node(self._unique_name(name), "constant", source or name, meta=meta))
        self.constants[node.name] = tensor
        return node

    def add_node(self, target, args=(), kwargs=None, meta=None, name: str | None = None) -> Node:
        """A call of `target`; the caller provides meta["val"] (passes never leave it empty)."""
        hint = name or getattr(target, "__name__", None) or format_target(target).split(".")[-2]
        node = Node(self._unique_name(hint.split(".")[0]), "call", target, args, kwargs, meta)
        return self._insert(node)

    def set_args(self, node: Node, args=None, kwargs=None) -> None:
        """Replace a node's arguments (and with them its incoming edges)."""
        for src in list(self.nx.predecessors(node)):
            self.nx.remove_edge(src, node)
        if args is not None:
            node.args = tuple(args)
        if kwargs is not None:
            node.kwargs = dict(kwargs)
        self._connect(node)

    def replace_all_uses(self, old: Node, new: Node) -> int:
        """Point every reader of `old` (and the outputs) at `new`; returns how many were changed.

        `new` itself keeps reading `old`, so `replace_all_uses(x, f(x))` inserts f after x.
        """
        swap = lambda n: new if n is old else n  # noqa: E731
        users = [u for u in self.users(old) if u is not new]
        for user in users:
            self.set_args(user, map_refs(user.args, swap), map_refs(user.kwargs, swap))
        changed = len(users)
        for i, out in enumerate(self.outputs):
            if out is old:
                self.outputs[i] = new
                changed += 1
        return changed

    def remove_node(self, node: Node) -> None:
        """Remove a node nobody reads (never an input: the inputs are the calling convention)."""
        if node.op == "input":
            raise GraphError(f"cannot remove input {node.name}: inputs are how the model is called")
        users = self.users(node)
        if users or self.is_output(node):
            readers = [u.name for u in users] + (["<outputs>"] if self.is_output(node) else [])
            raise GraphError(f"cannot remove {node.name}: still read by {readers}")
        self.nx.remove_node(node)
        del self._by_name[node.name]
        del self._rank[node]
        del self._level[node]
        if node.op == "constant":
            del self.constants[node.name]
        self._order_cache = None

    # -- checking ----------------------------------------------------------------------------
    def verify(self) -> "Graph":
        """Check the invariants; raise GraphError listing every broken one."""
        problems = []
        if not nx.is_directed_acyclic_graph(self.nx):
            cycle = nx.find_cycle(self.nx)
            problems.append("cycle: " + " -> ".join(u.name for u, _ in cycle) + f" -> {cycle[0][0].name}")
        for node in self.nx.nodes:
            if self._by_name.get(node.name) is not node:
                problems.append(f"node {node.name} is not registered under its name")
            for ref in iter_refs((node.args, node.kwargs)):
                if ref not in self:
                    problems.append(f"dangling reference: {node.name} reads {ref.name}, which is not in the graph")
            wanted = {ref for ref in iter_refs((node.args, node.kwargs)) if ref in self}
            if wanted != set(self.nx.predecessors(node)):
                problems.append(f"edges of {node.name} do not match its arguments (mutate through Graph methods)")
            if "val" not in node.meta:
                problems.append(f"node {node.name} has no meta['val']")
            if node.op == "call" and node.target is None:
                problems.append(f"call node {node.name} has no target")
            if node.op == "constant" and node.name not in self.constants:
                problems.append(f"constant {node.name} has no tensor")
        for out in self.output_nodes:
            if out not in self:
                problems.append(f"dangling reference: output {out.name} is not in the graph")
        for inp in self.inputs:
            if inp not in self or inp.op != "input":
                problems.append(f"input {inp.name} is not an input node of the graph")
        names = [n.name for n in self.inputs]
        problems += [f"mutation writes {m!r}, which is not an input" for m in self.mutations if m not in names]
        problems += [f"state {s!r} is not an input" for s in self.state if s not in names]
        if len(self.mutations) > len(self.outputs):
            problems.append(f"{len(self.mutations)} mutations but only {len(self.outputs)} outputs")
        if names[len(names) - len(self.state):] != [n for n in names if n in self.state]:
            problems.append("state inputs must come after the caller's inputs")
        if len(set(self.inputs)) != len(self.inputs):
            problems.append("an input is listed twice in graph.inputs")
        for node in self.nx.nodes:
            if node.op == "input" and node not in self.inputs:
                problems.append(f"input node {node.name} is missing from graph.inputs")
            if node.op == "constant" and node.name in self.constants:
                tensor = self.constants[node.name]
                if (tuple(tensor.shape), tensor.dtype) != (node.val.shape, node.val.dtype):
                    problems.append(f"constant {node.name} holds {tensor.dtype}{list(tensor.shape)}, meta says {node.val}")
        orphans = [name for name in self.constants if name not in self._by_name]
        if orphans:
            problems.append(f"constant tensors without a node: {orphans}")
        for node, sub in ((n, g) for n in self.nx.nodes for g in iter_graphs((n.args, n.kwargs))):
            try:
                sub.verify()
            except GraphError as exc:
                problems.append(f"the graph nested in {node.name}: {exc}")
        if problems:
            raise GraphError(f"graph {self.name} is broken:\n  " + "\n  ".join(problems))
        return self

    # -- showing -----------------------------------------------------------------------------
    def format_node(self, node: Node) -> str:
        meta = format_meta(node.val)
        if node.op == "input":
            return f"%{node.name}: {meta} = input"
        if node.op == "constant":
            return f"%{node.name}: {meta} = constant {node.target}"
        shown = [repr(a) for a in node.args] + [f"{k}={v!r}" for k, v in node.kwargs.items()]
        source = f"  # {node.meta['source']}" if node.meta.get("source") else ""
        return f"%{node.name}: {meta} = {format_target(node.target)}({', '.join(shown)}){source}"

    def __str__(self) -> str:
        header = f"graph {self.name}(" + ", ".join(f"{n.name}: {n.val}" for n in self.inputs) + ")"
        lines = [header]
        if self.dims:
            lines.append("  dims: " + ", ".join(str(r) for r in self.dims.values()))
        lines += ["  " + self.format_node(n) for n in self.nodes]
        lines.append("  return (" + ", ".join(repr(o) for o in self.outputs) + ")")
        if self.mutations:
            lines.append("  writes back: " + ", ".join(f"output {self.user_output_count + i} -> %{name}"
                                                      for i, name in enumerate(self.mutations)))
        for node, sub in self.nested():
            lines += ["  " + line for line in f"nested in %{node.name}: {sub}".splitlines()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<graph {self.name}: {len(self)} nodes>"

    def to_dot(self) -> str:
        """Graphviz DOT text: one box per node labelled with its op and output meta."""
        def quote(text: str) -> str:
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        styles = {"input": "shape=oval", "constant": "shape=box,style=dashed", "call": "shape=box"}
        lines = [f"digraph {quote(self.name)} {{", "  rankdir=TB;"]
        for node in self.nodes:
            op = node.op if node.op != "call" else format_target(node.target)
            label = f"{node.name}\\n{op}\\n{format_meta(node.val)}"
            lines.append(f"  {quote(node.name)} [label={quote(label)},{styles[node.op]}];")
        for src, dst in self.nx.edges:
            lines.append(f"  {quote(src.name)} -> {quote(dst.name)};")
        for i, out in enumerate(self.output_nodes):
            lines.append(f'  {quote(out.name)} -> "output"  [label="{i}"];')
        lines.append("}")
        return "\n".join(lines)

    # -- conversions -------------------------------------------------------------------------
    @classmethod
    def from_exported(cls, ep: torch.export.ExportedProgram, dim_names=None, name: str = "graph") -> "Graph":
        """Import an ExportedProgram; `dim_names` maps torch's shape symbols to the user's Dim names."""
        from blade.ir.fx_bridge import graph_from_exported

        return graph_from_exported(ep, dim_names or {}, name)

    def to_fx(self, targets: dict | None = None) -> torch.fx.GraphModule:
        """A GraphModule taking the flat inputs and returning the tuple of flat outputs (`targets`: node name ->
        the op to run instead, e.g. an in-place write)."""
        from blade.ir.fx_bridge import graph_to_fx

        return graph_to_fx(self, targets)

    def copy(self) -> "Graph":
        """A structural copy sharing the constant tensors (passes work on copies)."""
        new = Graph(self.name)
        new.dims = dict(self.dims)
        new.mutations, new.state, new.returns_tuple = list(self.mutations), dict(self.state), self.returns_tuple
        mapping: dict[Node, Node] = {}
        for node in self.nodes:
            if node.op == "input":
                mapping[node] = new.add_input(node.name, node.val)
                mapping[node].meta = dict(node.meta)
            elif node.op == "constant":
                mapping[node] = new.add_constant(node.name, self.constants[node.name], node.target)
            else:
                args = map_graphs(map_refs(node.args, mapping.__getitem__), Graph.copy)
                kwargs = map_graphs(map_refs(node.kwargs, mapping.__getitem__), Graph.copy)
                mapping[node] = new._insert(Node(node.name, "call", node.target, args, kwargs, node.meta))
        new.inputs = [mapping[n] for n in self.inputs]
        new.outputs = [mapping.get(o, o) if isinstance(o, Node) else o for o in self.outputs]
        return new

    def count_targets(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.call_nodes:
            key = format_target(node.target)
            counts[key] = counts.get(key, 0) + 1
        return counts

