"""The IR as JSON data and a tensor table — never pickle, never eval."""
from __future__ import annotations

import importlib
import math
import operator
from typing import Any

import torch

from blade.errors import ArtifactError
from blade.ir.fused import KINDS as FUSED_KINDS, FusedRegion
from blade.ir.fx_bridge import HIGHER_ORDER_OPS
from blade.ir.graph import Graph, Node, ScalarMeta, TensorMeta, format_target
from blade.ir.shapes import DimRange, size_from_json, size_to_json

FORMAT_VERSION = 2  # 2: mutations, state inputs, nested graphs; a graph without them is written as 1
READABLE_FORMATS = (1, 2)
FUSED_TARGET = "blade.fused"
HIGHER_ORDER = "higher_order"  # torch.ops.higher_order.<name>, saved as "higher_order.<name>"  # a fused node's target; its region is saved under "fused"

# Python callables (not ATen ops) that exported graphs use for symbolic size arithmetic.
_PYTHON_TARGETS = {
    f"operator.{fn.__name__}": fn
    for fn in (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
               operator.truediv, operator.mod, operator.neg, operator.pow, operator.eq, operator.ne,
               operator.lt, operator.le, operator.gt, operator.ge, operator.and_, operator.or_)
}
_PYTHON_TARGETS.update({
    f"torch.{name}": getattr(torch, name)
    for name in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite")
    if hasattr(torch, name)
})
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_SIMPLE_TYPES = {"int": int, "float": float, "bool": bool}


def is_size_arithmetic(target) -> bool:
    """One of the Python functions exported graphs use for symbolic sizes (operator.*, torch.sym_*)."""
    return _PYTHON_TARGETS.get(format_target(target)) is target


def target_to_json(target, where: str) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if isinstance(target, torch._ops.HigherOrderOperator) and target.name() in HIGHER_ORDER_OPS:
        return f"{HIGHER_ORDER}.{target.name()}"
    name = format_target(target)
    if _PYTHON_TARGETS.get(name) is target:
        return name
    raise ArtifactError(f"node {where}: cannot save target {name!r} (only torch ops and size arithmetic)")


# Namespaces a saved graph may call into; ops that write memory or touch files are refused on top.
_OP_NAMESPACES = ("aten", "prims", "blade")
_REFUSED_OPS = ("aten.from_file", "aten._nested_from_file")
# the only dunder-named operators (bitwise ops on bool masks, e.g. in transformers' causal masks)
_DUNDER_OPS = ("__and__", "__or__", "__xor__", "__lshift__", "__rshift__")


def target_from_json(name: str, trusted_namespaces: tuple[str, ...] = ()):
    """Resolve a saved target to a pure torch operator or a whitelisted function; nothing else.

    Only `namespace.op.overload` names in _OP_NAMESPACES resolve, only to OpOverloads, and only
    to ones that neither mutate their inputs nor read files: loading never runs other code.
    """
    if name in _PYTHON_TARGETS:
        return _PYTHON_TARGETS[name]
    if name.startswith(f"{HIGHER_ORDER}.") and name.split(".", 1)[1] in HIGHER_ORDER_OPS:
        importlib.import_module("torch._higher_order_ops")  # registers map_impl, while_loop and the others
        return getattr(torch.ops.higher_order, name.split(".", 1)[1])
    parts = name.split(".")
    if len(parts) != 3 or not all(p.isidentifier() for p in parts) or parts[2].startswith("_") \
            or (parts[1].startswith("__") and parts[1] not in _DUNDER_OPS):
        raise ArtifactError(f"the saved graph calls {name!r}, which is not a torch operator blade may load")
    if parts[0] not in _OP_NAMESPACES + tuple(trusted_namespaces):
        raise ArtifactError(
            f"the saved graph calls the custom operator {name}; load runs only aten/prims/blade operators "
            f"unless told otherwise — import the library that defines it, then "
            f"blade.load(path, trusted_namespaces=({parts[0]!r},))")
    namespace, op, overload = parts
    try:
        packet = getattr(getattr(torch.ops, namespace), op)
        target = getattr(packet, overload) if isinstance(packet, torch._ops.OpOverloadPacket) else None
    except (AttributeError, RuntimeError):
        raise ArtifactError(
            f"operator {name} is not available in this torch {torch.__version__} — install the torch "
            "version the artifact was compiled with, or recompile it here") from None
    if not isinstance(target, torch._ops.OpOverload):
        raise ArtifactError(f"the saved graph calls {name!r}, which is not a torch operator blade may load")
    if target._schema.is_mutable or f"{namespace}.{op}" in _REFUSED_OPS:
        raise ArtifactError(f"the saved graph calls {name}, which writes memory or reads files; refusing to load")
    return target


def value_to_json(value, where: str):
    """A literal or a reference in node arguments as tagged JSON."""
    if isinstance(value, Node):
        return {"node": value.name}
    if isinstance(value, Graph):
        if value.constants:
            raise ArtifactError(f"node {where}: the graph nested in it holds weights ({sorted(value.constants)}); "
                                "blade saves nested graphs that read their weights as inputs, as torch.export "
                                "makes them")
        return {"graph": graph_to_json(value)}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        items = [value_to_json(v, where) for v in value]
        return items if isinstance(value, list) else {"tuple": items}
    if isinstance(value, dict):
        return {"dict": {str(k): value_to_json(v, where) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": value.type}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise ArtifactError(f"node {where}: cannot save argument {value!r} of type {type(value).__name__}")


def value_from_json(data, nodes: dict[str, Node], trusted_namespaces: tuple[str, ...] = ()):
    if isinstance(data, list):
        return [value_from_json(v, nodes, trusted_namespaces) for v in data]
    if not isinstance(data, dict):
        return data
    (tag, payload), = data.items()
    if tag == "node":
        return nodes[payload]
    if tag == "tuple":
        return tuple(value_from_json(v, nodes, trusted_namespaces) for v in payload)
    if tag == "dict":
        return {k: value_from_json(v, nodes, trusted_namespaces) for k, v in payload.items()}
    if tag == "float":
        return float(payload)
    if tag == "graph":
        return graph_from_json(payload, {}, trusted_namespaces)
    if tag == "dtype":
        return _DTYPES[payload]
    if tag == "device":
        return torch.device(payload)
    if tag in ("layout", "memory_format"):
        value = getattr(torch, payload)
        if not isinstance(value, (torch.layout, torch.memory_format)):
            raise ArtifactError(f"bad {tag} {payload!r} in the saved graph")
        return value
    raise ArtifactError(f"unknown value tag {tag!r} in the saved graph")


def meta_to_json(val):
    if isinstance(val, TensorMeta):
        return {"shape": [size_to_json(s) for s in val.shape], "dtype": str(val.dtype).removeprefix("torch."),
                "device": val.device}
    if isinstance(val, ScalarMeta):
        value = val.value if isinstance(val.value, (bool, float)) or val.value is None else size_to_json(val.value)
        return {"scalar": val.type.__name__, "value": value}
    if isinstance(val, tuple):
        return {"tuple": [meta_to_json(v) for v in val]}
    return None


def meta_from_json(data, symbols):
    if data is None:
        return None
    if "tuple" in data:
        return tuple(meta_from_json(v, symbols) for v in data["tuple"])
    if "scalar" in data:
        kind = _SIMPLE_TYPES[data["scalar"]]
        value = data["value"]
        if kind is int and value is not None:
            value = size_from_json(value, symbols)
        return ScalarMeta(kind, value)
    return TensorMeta(tuple(size_from_json(s, symbols) for s in data["shape"]), _DTYPES[data["dtype"]],
                      data["device"])


def graph_to_json(graph: Graph) -> dict[str, Any]:
    """Everything about the graph but the constant tensors (saved apart, keyed by node name)."""
    nodes = []
    for node in graph.nodes:
        entry = {"name": node.name, "op": node.op, "meta": meta_to_json(node.val)}
        if node.op == "constant":
            entry["source"] = node.target
        if node.op == "input" and node.meta.get("source"):
            entry["source"] = node.meta["source"]
        if node.op == "call" and isinstance(node.target, FusedRegion):
            region = node.target
            entry["target"] = FUSED_TARGET
            entry["fused"] = {"kind": region.kind, "pattern": region.pattern,
                              "attrs": value_to_json(region.attrs, node.name), "body": graph_to_json(region.body)}
        elif node.op == "call":
            entry["target"] = target_to_json(node.target, node.name)
        if node.op == "call":
            entry["args"] = value_to_json(list(node.args), node.name)
            entry["kwargs"] = value_to_json(node.kwargs, node.name)
            if node.meta.get("source"):
                entry["source"] = node.meta["source"]
        nodes.append(entry)
    data = {
        "format": format_of(graph),
        "name": graph.name,
        "dims": [{"name": r.name, "min": r.min, "max": r.max} for r in graph.dims.values()],
        "nodes": nodes,
        "inputs": [n.name for n in graph.inputs],
        "outputs": [value_to_json(o, "<outputs>") for o in graph.outputs],
    }
    if graph.mutations or graph.state:
        data["mutations"], data["state"] = list(graph.mutations), list(graph.state)
    if not graph.returns_tuple:
        data["returns_tuple"] = False
    return data


def format_of(graph: Graph) -> int:
    """The oldest graph format that holds `graph`: 2 once it mutates, keeps state or nests graphs (a reader of
    format 1 would run it without writing anything back), else 1."""
    return 2 if graph.mutations or graph.state or graph.nested() or not graph.returns_tuple else 1


def _fused_from_json(entry: dict, trusted_namespaces: tuple[str, ...]) -> FusedRegion:
    """A fused node's region: its body is a saved graph like any other (same whitelist), with no weights."""
    data = entry.get("fused")
    if not isinstance(data, dict) or data.get("kind") not in FUSED_KINDS or not isinstance(data.get("pattern"), str):
        raise ArtifactError(f"node {entry['name']}: damaged fused region in the saved graph")
    body = graph_from_json(data["body"], {}, trusted_namespaces)
    return FusedRegion(data["kind"], data["pattern"], body, value_from_json(data["attrs"], {}))


def graph_from_json(data: dict[str, Any], constants: dict[str, torch.Tensor],
                    trusted_namespaces: tuple[str, ...] = ()) -> Graph:
    """Rebuild a Graph from graph_to_json data and its constant tensors, then verify it."""
    if data.get("format") not in READABLE_FORMATS:
        raise ArtifactError(f"graph format {data.get('format')} is not one this blade reads {READABLE_FORMATS}")
    graph = Graph(data["name"])
    graph.dims = {d["name"]: DimRange(d["name"], d["min"], d["max"]) for d in data["dims"]}
    symbols = graph.symbols
    by_name: dict[str, Node] = {}
    inputs = {}
    for entry in data["nodes"]:
        meta = meta_from_json(entry["meta"], symbols)
        name = entry["name"]
        if entry["op"] == "input":
            node = inputs[name] = graph.add_input(name, meta)
            if entry.get("source"):
                node.meta["source"] = entry["source"]
        elif entry["op"] == "constant":
            tensor = constants.get(name)
            if tensor is None:
                raise ArtifactError(f"weights file has no tensor for constant {name}")
            if (tuple(tensor.shape), tensor.dtype) != (meta.shape, meta.dtype):
                raise ArtifactError(f"weights file holds {name} as {tensor.dtype}{list(tensor.shape)}, but the "
                                    f"graph expects {meta}; the artifact is inconsistent")
            node = graph.add_constant(name, tensor, entry.get("source"))
        else:
            args = tuple(value_from_json(entry["args"], by_name, trusted_namespaces))
            kwargs = value_from_json(entry["kwargs"], by_name, trusted_namespaces)
            node_meta = {"val": meta, **({"source": entry["source"]} if entry.get("source") else {})}
            target = (_fused_from_json(entry, trusted_namespaces) if entry["target"] == FUSED_TARGET
                      else target_from_json(entry["target"], trusted_namespaces))
            node = graph.add_node(target, args, kwargs, node_meta, name=name)
        if node.name != name:
            raise ArtifactError(f"duplicate node name {name!r} in the saved graph")
        by_name[name] = node
    graph.inputs = [inputs[n] for n in data["inputs"]]
    graph.outputs = [value_from_json(o, by_name) for o in data["outputs"]]
    graph.mutations = [str(m) for m in data.get("mutations", [])]
    graph.returns_tuple = data.get("returns_tuple", True) is not False
    for name in data.get("state", []):
        if name not in constants:
            raise ArtifactError(f"weights file has no tensor for the state input {name}")
        graph.state[name] = constants[name]
    for out in graph.outputs:
        if not isinstance(out, (Node, int, float, bool, type(None))):
            raise ArtifactError(f"the saved graph returns {out!r}; outputs are tensors or numbers")
    return graph.verify()
