"""Shape guards: every call is checked against the captured input spec — never a silent recompile."""
from __future__ import annotations

import sympy
import torch

from blade.errors import ShapeError
from blade.ir.graph import Node, dtype_name
from blade.ir.shapes import DimRange, evaluate, format_shape, is_static


def check_inputs(inputs: list[Node], dims: dict[str, DimRange], tensors: list[torch.Tensor]) -> dict[str, int]:
    """Check rank, dtype, device and every dim of each input; return the value bound to each dim."""
    values: dict[str, int] = {}
    bound_by: dict[str, str] = {}
    derived = []
    for node, tensor in zip(inputs, tensors):
        meta = node.val
        name = node.name
        if tensor.dim() != meta.rank:
            raise ShapeError(f"input '{name}': expected a {meta.rank}-d tensor {format_shape(meta.shape)}, "
                             f"got {tensor.dim()}-d {list(tensor.shape)}")
        if tensor.dtype != meta.dtype:
            raise ShapeError(f"input '{name}': expected dtype {dtype_name(meta.dtype)} ({meta.dtype}), got "
                             f"{tensor.dtype}; cast it with .to({meta.dtype}) or compile with an example of that dtype")
        if tensor.device.type != meta.device:
            raise ShapeError(f"input '{name}': the model was compiled for {meta.device} tensors, got one on "
                             f"{tensor.device}; move it with .to('{meta.device}')")
        for axis, (want, got) in enumerate(zip(meta.shape, tensor.shape)):
            if is_static(want):
                if want != got:
                    raise ShapeError(f"input '{name}' dim {axis}: expected {want} (static), got {got} "
                                     f"(shape {list(tensor.shape)}); declare this dim in dynamic_shapes to vary it")
            elif want.is_Symbol:
                dim = want.name
                if dim in values and values[dim] != got:
                    raise ShapeError(f"input '{name}' dim {axis} ('{dim}'): got {got}, but input "
                                     f"'{bound_by[dim]}' has '{dim}' = {values[dim]}; inputs sharing a dim must agree")
                rng = dims.get(dim)
                if rng is not None and not rng.contains(got):
                    hi = "inf" if rng.max is None else rng.max
                    raise ShapeError(f"input '{name}' dim {axis} ('{dim}'): expected {rng.min or 0}..{hi}, got {got}; "
                                     "recompile with a wider range in dynamic_shapes")
                values[dim], bound_by[dim] = got, name
            else:
                derived.append((name, axis, want, got))
    for name, axis, want, got in derived:
        unbound = [s for s in want.free_symbols if s.name not in values]
        if len(unbound) == 1:
            _solve_root(name, axis, want, got, unbound[0], dims, values)
        elif unbound:
            raise ShapeError(f"input '{name}' dim {axis}: size {want} depends on several dims no input fixes")
        if evaluate(want, values) != got:
            raise ShapeError(f"input '{name}' dim {axis}: expected {want} = {evaluate(want, values)}, got {got}")
    return values


def _solve_root(name: str, axis: int, want, got: int, symbol, dims: dict[str, DimRange], values: dict) -> None:
    """Bind the dim a derived size (such as 2*d) is made of, and check it is whole and in range."""
    roots = [r for r in sympy.solve(sympy.Eq(want, got), symbol) if r.is_Integer]
    if not roots:
        raise ShapeError(f"input '{name}' dim {axis}: expected a size of the form {want}, got {got}")
    value, rng = int(roots[0]), dims.get(symbol.name)
    if rng is not None and not rng.contains(value):
        hi = "inf" if rng.max is None else rng.max
        raise ShapeError(f"input '{name}' dim {axis}: size {got} means {symbol.name} = {value}, outside "
                         f"{rng.min}..{hi}; recompile with a wider range in dynamic_shapes")
    values[symbol.name] = value
