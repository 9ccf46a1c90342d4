"""Symbolic shapes: dims as sympy symbols named after the user's torch.export Dims, with ranges."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import sympy
import torch

Size = Union[int, sympy.Expr]
Shape = tuple  # tuple[Size, ...]


def dim_symbol(name: str) -> sympy.Symbol:
    """The one symbol blade uses for the dynamic dim called `name`."""
    return sympy.Symbol(name, integer=True, positive=True)


@dataclass(frozen=True)
class DimRange:
    """The inclusive range a symbol may take; None means unbounded on that side (a data-dependent size such
    as `n.item()` has no lower bound; an input's dims always have one)."""

    name: str
    min: int | None
    max: int | None

    def contains(self, value: int) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def __str__(self) -> str:
        lo = "-inf" if self.min is None else str(self.min)
        hi = "inf" if self.max is None else str(self.max)
        return f"{self.name} in [{lo}, {hi}]"


def as_size(value) -> Size:
    """A python int, a torch.SymInt or a sympy expression as an int or a sympy expression."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return int(expr) if expr.is_Integer else expr
    if isinstance(value, sympy.Expr):
        return int(value) if value.is_Integer else value
    return int(value)


def is_static(size: Size) -> bool:
    return isinstance(size, int)


def free_dims(shape: Shape) -> set[str]:
    """Names of the dynamic dims a shape depends on."""
    return {s.name for size in shape if not is_static(size) for s in size.free_symbols}


def substitute(size: Size, mapping: Mapping[sympy.Symbol, sympy.Expr]) -> Size:
    """Rename or bind the symbols in a size."""
    if is_static(size):
        return size
    return as_size(size.xreplace(dict(mapping)))


def evaluate(size: Size, values: Mapping[str, int]) -> int:
    """The concrete value of a size once every dim it uses is bound."""
    if is_static(size):
        return size
    bound = size.xreplace({s: values[s.name] for s in size.free_symbols})
    return int(bound)


def format_size(size: Size) -> str:
    return str(size)


def format_shape(shape: Shape) -> str:
    return "[" + ", ".join(format_size(s) for s in shape) + "]"


def _expr_functions() -> dict[str, type]:
    """The sympy functions a saved shape may use, by name (torch's integer ops included)."""
    import torch.utils._sympy.functions as torch_sympy

    known = {name: getattr(sympy, name) for name in ("Add", "Mul", "Pow", "Mod", "Max", "Min", "floor", "ceiling")}
    for name in ("FloorDiv", "CeilDiv", "CleanDiv", "ModularIndexing", "PythonMod", "Mod", "Max", "Min"):
        if hasattr(torch_sympy, name):
            known.setdefault(name, getattr(torch_sympy, name))
    return known


def size_to_json(size: Size):
    """A size as JSON data: an int, or a tree of whitelisted sympy functions (never code)."""
    if is_static(size):
        return size
    return {"expr": _expr_to_json(size)}


def _expr_to_json(expr: sympy.Expr):
    if expr.is_Integer:
        return int(expr)
    if expr.is_Rational:
        return {"rational": [int(expr.p), int(expr.q)]}
    if expr.is_Symbol:
        return {"dim": expr.name}
    name = type(expr).__name__
    if name not in _expr_functions():
        raise ValueError(f"cannot save the shape expression {expr} (uses {name})")
    return {"fn": name, "args": [_expr_to_json(a) for a in expr.args]}


def size_from_json(data, symbols: Mapping[str, sympy.Symbol]) -> Size:
    """Rebuild a size written by size_to_json from the graph's own dims, without eval."""
    if isinstance(data, int):
        return data
    return as_size(_expr_from_json(data["expr"], symbols, _expr_functions()))


def _expr_from_json(data, symbols, functions):
    if isinstance(data, int):
        return sympy.Integer(data)
    if "rational" in data:
        return sympy.Rational(*data["rational"])
    if "dim" in data:
        if data["dim"] not in symbols:
            raise ValueError(f"shape uses the undeclared dim {data['dim']!r}")
        return symbols[data["dim"]]
    if data.get("fn") not in functions:
        raise ValueError(f"shape uses the unknown function {data.get('fn')!r}")
    args = [_expr_from_json(a, symbols, functions) for a in data["args"]]
    return functions[data["fn"]](*args)


def same_size(a: Size, b: Size) -> bool:
    """True when two sizes are provably equal for every value of the dims."""
    if a == b:
        return True
    if is_static(a) and is_static(b):
        return False
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0  # conservative: unproven means unequal


def same_shape(a: Shape, b: Shape) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))
