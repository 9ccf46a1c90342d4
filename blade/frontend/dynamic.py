"""`--dynamic batch=1:64,seq=1:2048`: dim ranges parsed and applied to a source's torch.export dynamic_shapes."""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from blade.errors import ConfigError

# Without dynamic_shapes from the source, these names mean these axes of every tensor input.
CONVENTIONS = {"batch": 0, "seq": 1}


def is_named_dim(spec) -> bool:
    """A user's torch.export Dim (an instance in torch 2.13, a class in 2.11); not a derived dim or a hint."""
    name = getattr(spec, "__name__", None)
    return isinstance(name, str) and name.isidentifier() and hasattr(spec, "min") and hasattr(spec, "max") \
        and not hasattr(spec, "root")


def parse_ranges(text: str) -> dict[str, tuple[int, int | None]]:
    """'batch=1:64,seq=1:2048' -> {'batch': (1, 64), 'seq': (1, 2048)}; 'seq=8:' has no upper bound."""
    ranges = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, span = item.partition("=")
        low, colon, high = span.partition(":")
        try:
            if not (sep and colon and name.isidentifier()):
                raise ValueError
            bounds = int(low), int(high) if high.strip() else None
        except ValueError:
            raise ConfigError(f"--dynamic item {item!r} is not NAME=MIN:MAX (e.g. batch=1:64)") from None
        if bounds[0] < 0 or (bounds[1] is not None and bounds[1] < bounds[0]):
            raise ConfigError(f"--dynamic {name}: the range {low}:{high} is empty or negative")
        if name in ranges:
            raise ConfigError(f"--dynamic names {name} twice")
        ranges[name] = bounds
    if not ranges:
        raise ConfigError("--dynamic needs at least one NAME=MIN:MAX")
    return ranges


def _new_dim(name: str, bounds: tuple[int, int | None]):
    low, high = bounds
    return Dim(name, min=low, max=high) if high is not None else Dim(name, min=low)


def apply_ranges(ranges: dict, example_inputs: tuple, dynamic_shapes):
    """The source's dynamic_shapes with each named Dim given the asked range (one new Dim per name, so
    inputs that shared a dim still share it); CONVENTIONS when the source declares none."""
    from blade.frontend.capture import normalize_example

    example_inputs, _ = normalize_example(example_inputs, None)
    dims = {name: _new_dim(name, bounds) for name, bounds in ranges.items()}
    if dynamic_shapes is None:
        unknown = sorted(set(ranges) - set(CONVENTIONS))
        if unknown:
            raise ConfigError(f"--dynamic {unknown}: the source declares no dynamic dims, so --dynamic knows only "
                              f"{sorted(CONVENTIONS)} (axes {CONVENTIONS}); return dynamic_shapes from the factory "
                              "to name others")

        def per_tensor(x):
            if not isinstance(x, torch.Tensor):
                return None
            axes = {axis: dims[name] for name, axis in CONVENTIONS.items() if name in dims and axis < x.dim()}
            return axes or None
        return tuple(pytree.tree_map(per_tensor, tuple(example_inputs), is_leaf=lambda x: isinstance(x, torch.Tensor)))
    found: set[str] = set()

    def replace(spec):
        root = getattr(spec, "root", None)
        if root is not None and getattr(root, "__name__", None) in dims:
            raise ConfigError(f"--dynamic {root.__name__}: the source also uses {spec.__name__}, derived from it; "
                              f"re-range it in the factory's dynamic_shapes instead")
        if is_named_dim(spec) and spec.__name__ in dims:
            found.add(spec.__name__)
            return dims[spec.__name__]
        if isinstance(spec, dict):
            return {key: replace(value) for key, value in spec.items()}
        if isinstance(spec, (list, tuple)):
            return type(spec)(replace(value) for value in spec)
        return spec

    replaced = replace(dynamic_shapes)
    missing = sorted(set(ranges) - found)
    if missing:
        raise ConfigError(f"--dynamic {missing}: the source's dynamic_shapes have no dim of that name; "
                          f"it names {sorted(_names(dynamic_shapes))}")
    return replaced


def _names(spec) -> set[str]:
    if is_named_dim(spec):
        return {spec.__name__}
    if isinstance(spec, dict):
        return set().union(*(_names(v) for v in spec.values())) if spec else set()
    if isinstance(spec, (list, tuple)):
        return set().union(*(_names(v) for v in spec)) if spec else set()
    return set()
