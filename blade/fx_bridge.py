"""Conversions between torch.fx (ExportedProgram graphs, GraphModules) and the blade IR."""
from __future__ import annotations

import sympy
import torch
import torch.fx
from torch.export.graph_signature import InputKind, OutputKind

from blade.errors import CaptureError
from blade.ir import Graph, Node, ScalarMeta, TensorMeta, map_refs
from blade.shapes import DimRange, as_size, dim_symbol, substitute

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
        upper = value_range.upper
        bounded = isinstance(upper, int) or getattr(upper, "is_Integer", False)
        ranges[new.name] = DimRange(new.name, int(value_range.lower), int(upper) if bounded else None)
    return ranges


def _check_signature(ep: torch.export.ExportedProgram) -> None:
    sig = ep.graph_signature
    for spec in sig.input_specs:
        if spec.kind not in _CONSTANT_KINDS and spec.kind != InputKind.USER_INPUT:
            raise CaptureError(f"input {spec.arg.name} is a {spec.kind.name}: blade compiles tensor-only models")
    for spec in sig.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            target = spec.target or spec.arg.name
            raise CaptureError(
                f"the model mutates {target} ({spec.kind.name}) during forward; blade compiles inference "
                "graphs without state updates — keep such state outside the model or pass it as an input (a "
                "program exported in train mode updates batch-norm statistics: export after model.eval())")


def graph_from_exported(ep: torch.export.ExportedProgram, dim_names: dict, name: str) -> Graph:
    """Build the blade IR from an (inference) ExportedProgram."""
    _check_signature(ep)
    sig = ep.graph_signature
    kinds = {spec.arg.name: spec for spec in sig.input_specs}
    rename = {sym: dim_symbol(new) for sym, new in dim_names.items()}
    graph = Graph(name)
    graph.dims = symbol_ranges(ep, rename)
    env: dict[torch.fx.Node, Node] = {}
    for fx_node in ep.graph.nodes:
        if fx_node.op == "placeholder":
            spec = kinds[fx_node.name]
            if spec.kind == InputKind.USER_INPUT:
                meta = meta_from_value(fx_node.meta.get("val"), rename)
                if not isinstance(meta, TensorMeta):
                    raise CaptureError(
                        f"input {fx_node.name} is not a tensor ({fx_node.meta.get('val')!r}); blade compiles "
                        "tensor inputs only — bind other arguments with functools.partial or a wrapper module")
                env[fx_node] = graph.add_input(fx_node.name, meta)
            else:
                tensor = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
                env[fx_node] = graph.add_constant(fx_node.name, tensor.detach(), spec.target)
        elif fx_node.op == "call_function":
            args = _plain(torch.fx.node.map_arg(fx_node.args, env.__getitem__))
            kwargs = _plain(torch.fx.node.map_arg(fx_node.kwargs, env.__getitem__))
            meta = {"val": meta_from_value(fx_node.meta.get("val"), rename)}
            if _source_of(fx_node):
                meta["source"] = _source_of(fx_node)
            env[fx_node] = graph.add_node(fx_node.target, args, kwargs, meta, name=fx_node.name)
        elif fx_node.op == "output":
            outputs = fx_node.args[0]
            graph.outputs = [env[o] if isinstance(o, torch.fx.Node) else o for o in outputs]
        else:
            raise CaptureError(
                f"node {fx_node.name} ({fx_node.op} {fx_node.target}) holds a nested subgraph; blade's IR does "
                "not support control-flow or other higher-order ops yet — compute both branches and select "
                "with torch.where, or move the branch outside the model")
    return graph


def graph_to_fx(graph: Graph) -> torch.fx.GraphModule:
    """Lower the IR to a GraphModule: placeholders = graph.inputs, buffers = constants."""
    root = torch.nn.Module()
    fx_graph = torch.fx.Graph()
    env: dict[Node, torch.fx.Node] = {}
    for node in graph.inputs:
        env[node] = fx_graph.placeholder(node.name)
    for node in graph.nodes:
        if node.op == "input":
            continue
        if node.op == "constant":
            root.register_buffer(node.name, graph.constants[node.name], persistent=False)
            env[node] = fx_graph.get_attr(node.name)
        else:
            args = map_refs(node.args, env.__getitem__)
            kwargs = map_refs(node.kwargs, env.__getitem__)
            env[node] = fx_graph.create_node("call_function", node.target, args, kwargs, name=node.name)
    fx_graph.output(tuple(env[o] if isinstance(o, Node) else o for o in graph.outputs))
    return torch.fx.GraphModule(root, fx_graph, class_name=f"Blade_{graph.name}")
