"""How a compiled model is called: binding args/kwargs to the flat inputs, and rebuilding outputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

from blade.errors import BackendError, InputError
from blade.structure import count_leaves, describe, spec_to_json, unflatten


@dataclass
class Signature:
    """The captured calling convention: structure of (args, kwargs), of the outputs, and arg names."""

    in_tree: dict
    out_tree: dict
    arg_names: list[str] = field(default_factory=list)

    @property
    def positional_count(self) -> int:
        return len(self.in_tree["children"][0]["children"])

    @property
    def keyword_names(self) -> list[str]:
        return list(self.in_tree["children"][1].get("keys", []))

    def flatten(self, args: tuple, kwargs: dict) -> list:
        """The flat input leaves of a call, in the order the graph's inputs expect."""
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec_to_json(spec) != self.in_tree or any(leaf is None for leaf in leaves):
            args, kwargs = self._rebind(args, kwargs)
            leaves, spec = pytree.tree_flatten((args, kwargs))
            if spec_to_json(spec) != self.in_tree:
                raise InputError(f"inputs are structured as {describe(spec_to_json(spec))}, but the model was "
                                 f"compiled for {describe(self.in_tree)}")
        if any(leaf is None for leaf in leaves):
            raise InputError(f"an input the model was compiled with is None; pass a tensor "
                             f"(compiled inputs: {describe(self.in_tree)})")
        return leaves

    def _rebind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Move arguments between positional and keyword form to match the captured call."""
        if not self.arg_names:
            return tuple(args), dict(kwargs)
        if len(args) > len(self.arg_names):
            raise InputError(f"got {len(args)} positional inputs; the model takes {self.arg_names}")
        given = dict(zip(self.arg_names, args))
        for key, value in kwargs.items():
            if key in given:
                raise InputError(f"input '{key}' given both by position and by name")
            given[key] = value
        wanted_pos = self.arg_names[:self.positional_count]
        wanted = wanted_pos + self.keyword_names
        extra = [k for k in given if k not in wanted and given[k] is not None]
        missing = [k for k in wanted if k not in given]
        if extra:
            raise InputError(f"unexpected input(s) {extra}; the model was compiled with inputs {wanted}")
        if missing:
            raise InputError(f"missing input(s) {missing}; the model was compiled with inputs {wanted}")
        return tuple(given[k] for k in wanted_pos), {k: given[k] for k in self.keyword_names}

    def unflatten(self, outputs: list):
        if len(outputs) != count_leaves(self.out_tree):
            raise BackendError(f"backend returned {len(outputs)} outputs, expected {count_leaves(self.out_tree)}")
        return unflatten(self.out_tree, outputs)

    def as_dict(self) -> dict:
        return {"in_tree": self.in_tree, "out_tree": self.out_tree, "arg_names": self.arg_names}

    @classmethod
    def from_dict(cls, data: dict) -> "Signature":
        return cls(data["in_tree"], data["out_tree"], list(data.get("arg_names", [])))


def check_tensor_leaves(args: tuple, kwargs: dict, what: str = "input") -> None:
    """Every leaf of the inputs must be a tensor (None stands for an absent optional input)."""
    for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            where = _path_name(path)
            raise InputError(
                f"{what} {where} is a {type(leaf).__name__} ({leaf!r}); blade compiles models whose inputs are "
                "tensors — make it a tensor, or bind it with functools.partial / a wrapper module")


def _path_name(path) -> str:
    """'args[1]' or 'attention_mask' (plus any nesting) for a key path into (args, kwargs)."""
    top, first, *rest = path
    head = f"args[{first.idx}]" if top.idx == 0 else str(first.key)
    return "'" + head + "".join(str(k) for k in rest) + "'"
