"""Conversions between torch.fx (ExportedProgram graphs, GraphModules) and the blade IR."""
from __future__ import annotations

import sympy
import torch
import torch.fx
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind

from blade.errors import CaptureError
from blade.ir.graph import Graph, Node, ScalarMeta, TensorMeta, map_graphs, map_refs
from blade.ir.shapes import DimRange, as_size, dim_symbol, substitute

_CONSTANT_KINDS = {InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}


def meta_from_value(val, rename) -> object:
    """TensorMeta / ScalarMeta (or a tuple of them) for an fx node's meta['val']."""
    if isinstance(val, torch.Tensor):
        shape = tuple(substitute(as_size(s), rename) for s in val.shape)
        return TensorMeta(shape, val.dtype, val.device.type)
    if isinstance(val, (tuple, list)):
        return tuple(meta_from_value(v, rename) for v in val)
    if isinstance(val, torch.SymInt):
        return ScalarMeta(int, substitute(as_size(val), rename))
    if isinstance(val, (torch.SymFloat, torch.SymBool)):
        return ScalarMeta(float if isinstance(val, torch.SymFloat) else bool)
    if isinstance(val, (bool, int, float)):
        return ScalarMeta(type(val), val)
    return None


def _plain(obj):
    """fx's immutable lists and dicts as plain ones, so passes can rebuild arguments freely."""
    return map_refs(obj, lambda node: node)


def _source_of(fx_node: torch.fx.Node) -> str | None:
    stack = fx_node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path if path and not path.startswith("_") else None


def symbol_ranges(ep: torch.export.ExportedProgram, rename) -> dict[str, DimRange]:
    """The range of every shape symbol torch.export recorded, under blade's names."""
    ranges = {}
    for symbol, value_range in ep.range_constraints.items():
        new = rename.get(symbol, symbol)
        if not isinstance(new, sympy.Symbol):
            continue
        ranges[new.name] = DimRange(new.name, _finite(value_range.lower), _finite(value_range.upper))
    return ranges


def _finite(bound) -> int | None:
    """A range bound as an int, None where torch says it is unbounded (int_oo, -int_oo, sympy's oo)."""
    if isinstance(bound, int) or getattr(bound, "is_Integer", False):
        return int(bound)
    return None


_MUTATIONS = {OutputKind.BUFFER_MUTATION, OutputKind.USER_INPUT_MUTATION} | \
    ({OutputKind.PARAMETER_MUTATION} if hasattr(OutputKind, "PARAMETER_MUTATION") else set())


def _check_signature(ep: torch.export.ExportedProgram) -> None:
    sig = ep.graph_signature
    for spec in sig.input_specs:
        if spec.kind not in _CONSTANT_KINDS and spec.kind != InputKind.USER_INPUT:
            raise CaptureError(f"input {spec.arg.name} is a {spec.kind.name}: blade compiles tensor-only models")
    for spec in sig.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT and spec.kind not in _MUTATIONS:
            target = spec.target or spec.arg.name
            raise CaptureError(
                f"the model's forward produces {target} as a {spec.kind.name}; blade compiles inference graphs "
                "(a program exported in train mode updates batch-norm statistics: export after model.eval())")


def graph_from_exported(ep: torch.export.ExportedProgram, dim_names: dict, name: str) -> Graph:
    """Build the blade IR from an (inference) ExportedProgram.

    A program that mutates (after torch.export's functionalization) returns the new values of the inputs and
    buffers it writes; in the IR they follow the user's outputs, `graph.mutations` names the input each one is
    written back to, and every mutated buffer becomes a state input (a copy of its value, which the compiled
    model owns) after the user's inputs.
    """
    _check_signature(ep)
    sig = ep.graph_signature
    kinds = {spec.arg.name: spec for spec in sig.input_specs}
    mutated = {spec.target for spec in sig.output_specs if spec.kind in _MUTATIONS and
               spec.kind != OutputKind.USER_INPUT_MUTATION}
    rename = {sym: dim_symbol(new) for sym, new in dim_names.items()}
    graph = Graph(name)
    graph.dims = symbol_ranges(ep, rename)
    env: dict[torch.fx.Node, Node] = {}
    by_target: dict[str, Node] = {}  # buffer or user input name -> its input node
    for fx_node in ep.graph.nodes:
        if fx_node.op == "placeholder":
            spec = kinds[fx_node.name]
            if spec.kind == InputKind.USER_INPUT and isinstance(spec.arg, ConstantArgument):
                env[fx_node] = spec.arg.value  # specialised by torch.export; the signature checks every call
            elif spec.kind == InputKind.USER_INPUT:
                meta = meta_from_value(fx_node.meta.get("val"), rename)
                if not isinstance(meta, TensorMeta):
                    raise CaptureError(
                        f"input {fx_node.name} is not a tensor ({fx_node.meta.get('val')!r}): a dynamic number "
                        "(a SymInt) is not an input blade compiles — pass it as a 0-d tensor, or leave it out of "
                        "dynamic_shapes so that torch.export specialises it to the example's value")
                env[fx_node] = by_target[fx_node.name] = graph.add_input(fx_node.name, meta)
            else:
                tensor = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
                if spec.target in mutated:
                    node = graph.add_input(fx_node.name, meta_from_value(tensor, rename))
                    node.meta["source"] = spec.target
                    graph.state[node.name] = tensor.detach().clone()
                    env[fx_node] = by_target[spec.target] = node
                else:
                    env[fx_node] = graph.add_constant(fx_node.name, tensor.detach(), spec.target)
        elif fx_node.op == "call_function":
            env[fx_node] = _call_node(graph, fx_node, env, rename)
        elif fx_node.op == "get_attr":
            env[fx_node] = _attribute(ep.graph_module, fx_node, graph, rename, graph.dims)
        elif fx_node.op == "output":
            values = [env[o] if isinstance(o, torch.fx.Node) else o for o in fx_node.args[0]]
            specs = sig.output_specs
            graph.outputs = [v for v, spec in zip(values, specs) if spec.kind == OutputKind.USER_OUTPUT]
            writes = [(v, spec) for v, spec in zip(values, specs) if spec.kind in _MUTATIONS]
            graph.outputs += [v for v, _ in writes]
            graph.mutations = [by_target[spec.target].name for _, spec in writes]
        else:
            raise CaptureError(f"node {fx_node.name} ({fx_node.op} {fx_node.target}) is not an op blade holds")
    graph.inputs = graph.user_inputs + [n for n in graph.inputs if n.name in graph.state]
    return graph


def graph_to_fx(graph: Graph, targets: dict | None = None) -> torch.fx.GraphModule:
    """Lower the IR to a GraphModule: placeholders = graph.inputs, buffers = constants; `targets` (node name ->
    op) runs those nodes as another op (an in-place write)."""
    targets = targets or {}
    root = torch.nn.Module()
    fx_graph = torch.fx.Graph()
    env: dict[Node, torch.fx.Node] = {}
    modules: dict[int, torch.fx.Node] = {}

    def submodule(nested: Graph) -> torch.fx.Node:
        """A nested graph as a submodule of the root and the get_attr node that reads it (once per graph)."""
        if id(nested) not in modules:
            name = f"{nested.name}_{len(modules)}".replace(".", "_")
            root.add_module(name, graph_to_fx(nested))
            modules[id(nested)] = fx_graph.get_attr(name)
        return modules[id(nested)]

    for node in graph.inputs:
        env[node] = fx_graph.placeholder(node.name)
    for node in graph.nodes:
        if node.op == "input":
            continue
        if node.op == "constant":
            root.register_buffer(node.name, graph.constants[node.name], persistent=False)
            env[node] = fx_graph.get_attr(node.name)
        else:
            args = map_graphs(map_refs(node.args, env.__getitem__), submodule)
            kwargs = map_graphs(map_refs(node.kwargs, env.__getitem__), submodule)
            target = targets.get(node.name, node.target)
            env[node] = fx_graph.create_node("call_function", target, args, kwargs, name=node.name)
    outputs = tuple(env[o] if isinstance(o, Node) else o for o in graph.outputs)
    fx_graph.output(outputs if graph.returns_tuple else outputs[0])
    return torch.fx.GraphModule(root, fx_graph, class_name=f"Blade_{graph.name}")


def _graph_from_module(gm: torch.fx.GraphModule, rename: dict, name: str, dims: dict) -> Graph:
    """A nested GraphModule of the exported program (a cond branch, a loop body) as a blade Graph: its
    placeholders are its inputs (torch.export passes it every tensor it reads, weights included)."""
    graph = Graph(name)
    graph.dims = dims
    env: dict[torch.fx.Node, object] = {}
    for fx_node in gm.graph.nodes:
        if fx_node.op == "placeholder":
            meta = meta_from_value(fx_node.meta.get("val"), rename)
            if meta is None:
                raise CaptureError(f"input {fx_node.name} of the nested graph {name} has no shape (torch.export "
                                   "recorded no value for it); blade cannot hold this program")
            env[fx_node] = graph.add_input(fx_node.name, meta)
        elif fx_node.op == "get_attr":
            env[fx_node] = _attribute(gm, fx_node, graph, rename, dims)
        elif fx_node.op == "call_function":
            env[fx_node] = _call_node(graph, fx_node, env, rename)
        elif fx_node.op == "output":
            result = fx_node.args[0]
            graph.returns_tuple = isinstance(result, (tuple, list))
            result = result if graph.returns_tuple else (result,)
            graph.outputs = [env[o] if isinstance(o, torch.fx.Node) else o for o in result]
        else:
            raise CaptureError(f"node {fx_node.name} ({fx_node.op}) of the nested graph {name} is not an op blade "
                               "holds")
    return graph


def _attribute(gm, fx_node: torch.fx.Node, graph: Graph, rename: dict, dims: dict):
    """A get_attr node: a nested GraphModule becomes a nested Graph, a tensor a constant."""
    value = getattr(gm, fx_node.target)
    if isinstance(value, torch.fx.GraphModule):
        return _graph_from_module(value, rename, fx_node.target, dims)
    if isinstance(value, torch.Tensor):
        return graph.add_constant(fx_node.name, value.detach(), fx_node.target)
    raise CaptureError(f"node {fx_node.name} reads {fx_node.target}, a {type(value).__name__}; blade holds nested "
                       "graphs and tensors only")


def _call_node(graph: Graph, fx_node: torch.fx.Node, env: dict, rename: dict) -> Node:
    if isinstance(fx_node.target, torch._ops.HigherOrderOperator) and fx_node.target.name() not in HIGHER_ORDER_OPS:
        if fx_node.target.name().startswith("auto_functionalized"):
            op = fx_node.args[0] if fx_node.args else "?"
            raise CaptureError(f"node {fx_node.name} calls the custom operator {op}, which mutates its inputs "
                               f"(torch.export wraps it in {fx_node.target.name()}); blade compiles custom operators "
                               "that return new tensors — declare mutates_args=() and return the result")
        raise CaptureError(
            f"node {fx_node.name} calls torch.ops.higher_order.{fx_node.target.name()}, which blade does not "
            f"compile (it holds {', '.join(sorted(HIGHER_ORDER_OPS))}); rewrite that part without it")
    args = _plain(torch.fx.node.map_arg(fx_node.args, env.__getitem__))
    kwargs = _plain(torch.fx.node.map_arg(fx_node.kwargs, env.__getitem__))
    meta = {"val": meta_from_value(fx_node.meta.get("val"), rename)}
    if _source_of(fx_node):
        meta["source"] = _source_of(fx_node)
    return graph.add_node(fx_node.target, args, kwargs, meta, name=fx_node.name)


# torch.export's control flow (nested graphs as arguments) that blade holds, runs and saves
HIGHER_ORDER_OPS = frozenset({"cond", "map_impl", "while_loop"})

