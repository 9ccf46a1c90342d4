"""Input and output structure (tuples, dicts, dataclasses, ModelOutputs) as JSON data.

A pytree TreeSpec becomes a JSON tree that an artifact can carry. Rebuilding never imports a
module: a custom container class is used only if it is already registered with torch's pytree in
this process; otherwise the output comes back as a dict (keyed containers) or a tuple.
"""
from __future__ import annotations

import functools
import sys
from collections import namedtuple
from typing import Any

import torch.utils._pytree as pytree


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _context_to_json(ctx):
    if ctx is None or isinstance(ctx, (str, int, bool, float)):
        return ctx
    if isinstance(ctx, (list, tuple)):
        items = [_context_to_json(c) for c in ctx]
        return items if isinstance(ctx, list) else {"tuple": items}
    raise TypeError(type(ctx).__name__)


def _key_to_json(key):
    try:
        return _context_to_json(key)
    except TypeError:
        return str(key)  # an exotic key type comes back as its text


def _context_from_json(data):
    if isinstance(data, list):
        return [_context_from_json(d) for d in data]
    if isinstance(data, dict):
        return tuple(_context_from_json(d) for d in data["tuple"])
    return data


def spec_to_json(spec: pytree.TreeSpec) -> dict[str, Any]:
    """A TreeSpec as a JSON tree."""
    if spec.is_leaf():
        return {"kind": "leaf"}
    cls = spec.type
    children = [spec_to_json(c) for c in (spec.children() if hasattr(spec, "children") else spec.children_specs)]
    if cls is type(None):
        return {"kind": "none"}
    if cls in (tuple, list):
        return {"kind": cls.__name__, "children": children}
    if cls is dict:
        return {"kind": "dict", "keys": [_key_to_json(k) for k in spec.context], "children": children}
    if cls is namedtuple:  # torch files every namedtuple under this one key, the class as context
        real = spec.context
        return {"kind": "namedtuple", "class": _qualname(real), "fields": list(real._fields), "children": children}
    keys, none_keys = _keys_of(cls, spec.context, len(children))
    tree = {"kind": "custom", "class": _qualname(cls), "keys": keys, "none_keys": none_keys, "children": children}
    try:
        tree["context"] = {"value": _context_to_json(spec.context)}
    except TypeError:
        pass  # not data: rebuilt as a dict or tuple instead
    return tree


def _keys_of(cls, context, n: int) -> tuple[list[str] | None, list[str]]:
    """Field names of a keyed container for the dict fallback: (keys of the children, fields that were None)."""
    def names(seq):
        return isinstance(seq, (list, tuple)) and all(isinstance(k, str) for k in seq)
    if names(context) and len(context) == n:
        return list(context), []  # ModelOutput: the keys present
    if isinstance(context, (list, tuple)) and len(context) == 2 and names(context[0]) and len(context[0]) == n:
        return list(context[0]), list(context[1]) if names(context[1]) else []  # dataclass: (flat, none)
    fields = getattr(cls, "__dataclass_fields__", None)
    if fields and len(fields) == n:
        return list(fields), []
    return None, []


def _registered_class(name: str) -> type | None:
    return _registered_class_among(name, len(pytree.SUPPORTED_NODES))


@functools.lru_cache(maxsize=256)
def _registered_class_among(name: str, registered: int) -> type | None:
    """The registered class named `name`, looked up once per size of the registry (a registration changes it)."""
    for cls in pytree.SUPPORTED_NODES:
        if _qualname(cls) == name:
            return cls
    return None


def _loaded_class(name: str) -> type | None:
    module, _, qualname = name.rpartition(".")
    obj = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    return obj if isinstance(obj, type) else None


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _is_namedtuple_class(cls, fields: list[str]) -> bool:
    """Only a real namedtuple class with exactly these fields is ever called on loaded values."""
    return (isinstance(cls, type) and issubclass(cls, tuple) and list(getattr(cls, "_fields", ())) == fields)


def count_leaves(tree: dict[str, Any]) -> int:
    if tree["kind"] == "leaf":
        return 1
    return sum(count_leaves(c) for c in tree.get("children", []))


def unflatten(tree: dict[str, Any], leaves: list) -> Any:
    """Rebuild the structure described by `tree` around `leaves` (in flatten order)."""
    return _build(tree, iter(leaves))


def _build(node: dict[str, Any], leaves) -> Any:
    # A plain recursive function, not a closure over `leaves`: a self-referencing closure is a
    # reference cycle that would keep every call's outputs alive until the cycle collector runs.
    kind = node["kind"]
    if kind == "leaf":
        return next(leaves)
    if kind == "none":
        return None
    values = [_build(c, leaves) for c in node.get("children", [])]
    if kind in ("tuple", "list"):
        return tuple(values) if kind == "tuple" else values
    if kind == "dict":
        return dict(zip((_hashable(_context_from_json(k)) for k in node["keys"]), values))
    if kind == "namedtuple":
        cls = _loaded_class(node["class"])
        if _is_namedtuple_class(cls, node["fields"]):
            return cls(*values)
        return dict(zip(node["fields"], values))
    cls = _registered_class(node["class"])
    if cls is not None and "context" in node:
        return pytree.SUPPORTED_NODES[cls].unflatten_fn(values, _context_from_json(node["context"]["value"]))
    if node.get("keys"):
        return {**dict(zip(node["keys"], values)), **dict.fromkeys(node.get("none_keys", []))}
    return tuple(values)


def describe(tree: dict[str, Any]) -> str:
    """A short human description of a structure, e.g. (tensor, {mask: tensor})."""
    kind = tree["kind"]
    if kind == "leaf":
        return "tensor"
    if kind == "none":
        return "None"
    parts = [describe(c) for c in tree.get("children", [])]
    if kind == "dict":
        return "{" + ", ".join(f"{k}: {p}" for k, p in zip(tree["keys"], parts)) + "}"
    if kind == "list":
        return "[" + ", ".join(parts) + "]"
    name = "" if kind == "tuple" else tree["class"].rsplit(".", 1)[-1]
    return f"{name}(" + ", ".join(parts) + ")"
