"""How a compiled model is called: binding args/kwargs to the flat inputs, and rebuilding outputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

from blade.errors import BackendError, InputError, ShapeError
from blade.ir.structure import count_leaves, describe, spec_to_json, unflatten


CONSTANT_TYPES = (bool, int, float, str)  # non-tensor inputs torch.export specialises to the example's value


@dataclass
class Signature:
    """The captured calling convention: structure of (args, kwargs), of the outputs, and arg names.

    `constants` maps the index of an input leaf to the value torch.export specialised it to (a flag, a mode
    string, an int): every call must pass that value there, which is checked and then left out of the flat
    tensors the graph takes."""

    in_tree: dict
    out_tree: dict
    arg_names: list[str] = field(default_factory=list)
    constants: dict[int, object] = field(default_factory=dict)
    # the TreeSpec of the last call whose structure matched in_tree: a call shaped like it skips the JSON compare
    _matched_spec: object = field(default=None, init=False, repr=False, compare=False)
    _out_count: int | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def positional_count(self) -> int:
        return len(self.in_tree["children"][0]["children"])

    @property
    def keyword_names(self) -> list[str]:
        return list(self.in_tree["children"][1].get("keys", []))

    def flatten(self, args: tuple, kwargs: dict) -> list:
        """The flat input leaves of a call, in the order the graph's inputs expect."""
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec == self._matched_spec and not any(leaf is None for leaf in leaves):
            return self._without_constants(leaves, args, kwargs)
        if spec_to_json(spec) != self.in_tree or any(leaf is None for leaf in leaves):
            args, kwargs = self._rebind(args, kwargs)
            leaves, spec = pytree.tree_flatten((args, kwargs))
            if spec_to_json(spec) != self.in_tree:
                raise InputError(f"inputs are structured as {describe(spec_to_json(spec))}, but the model was "
                                 f"compiled for {describe(self.in_tree)}")
        if any(leaf is None for leaf in leaves):
            raise InputError(f"an input the model was compiled with is None; pass a tensor "
                             f"(compiled inputs: {describe(self.in_tree)})")
        if spec_to_json(spec) == self.in_tree:
            self._matched_spec = spec
        return self._without_constants(leaves, args, kwargs)

    def _without_constants(self, leaves: list, args, kwargs) -> list:
        """The tensor leaves, after checking that each specialised input has its compiled value."""
        def name(index: int) -> str:
            path = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))[0][index][0]
            top, first, *rest = path
            if top.idx == 0 and first.idx < len(self.arg_names):  # args[1] is the parameter `flag`
                return "'" + self.arg_names[first.idx] + "".join(str(k) for k in rest) + "'"
            return _path_name(path)

        for index, want in self.constants.items():
            got = leaves[index]
            if type(got) is not type(want) or got != want:
                raise ShapeError(f"input {name(index)} was specialised to {want!r} when the model was compiled "
                                 f"(torch.export makes such non-tensor inputs constants); got {got!r} — compile "
                                 "again with that value, or pass it as a tensor")
        for index, leaf in enumerate(leaves):
            if index not in self.constants and not isinstance(leaf, torch.Tensor):
                raise InputError(f"input {name(index)} is a {type(leaf).__name__} ({leaf!r}); the model was compiled "
                                 "with a tensor there")
        return [leaf for i, leaf in enumerate(leaves) if i not in self.constants]

    def unflatten_inputs(self, tensors: list) -> tuple[tuple, dict]:
        """(args, kwargs) of a call from the graph's flat tensors, the specialised constants put back."""
        tensors = iter(tensors)
        total = count_leaves(self.in_tree)
        leaves = [self.constants[i] if i in self.constants else next(tensors) for i in range(total)]
        return unflatten(self.in_tree, leaves)

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
        if self._out_count is None:
            self._out_count = count_leaves(self.out_tree)
        if len(outputs) != self._out_count:
            raise BackendError(f"backend returned {len(outputs)} outputs, expected {self._out_count}")
        return unflatten(self.out_tree, outputs)

    def as_dict(self) -> dict:
        data = {"in_tree": self.in_tree, "out_tree": self.out_tree, "arg_names": self.arg_names}
        if self.constants:
            data["constants"] = {str(i): v for i, v in self.constants.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Signature":
        constants = {int(i): v for i, v in data.get("constants", {}).items()}
        if not all(isinstance(v, CONSTANT_TYPES) for v in constants.values()):
            raise BackendError("the saved signature holds a constant input that is not a bool, int, float or str")
        return cls(data["in_tree"], data["out_tree"], list(data.get("arg_names", [])), constants)


def check_tensor_leaves(args: tuple, kwargs: dict, what: str = "input") -> None:
    """Every leaf of the inputs must be a tensor or a plain constant (a bool, int, float or str, which
    torch.export specialises); None stands for an absent optional input."""
    for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
        if leaf is not None and not isinstance(leaf, (torch.Tensor, *CONSTANT_TYPES)):
            where = _path_name(path)
            raise InputError(
                f"{what} {where} is a {type(leaf).__name__} ({leaf!r}); blade compiles models whose inputs are "
                "tensors — make it a tensor, or bind it with functools.partial / a wrapper module")


def _path_name(path) -> str:
    """'args[1]' or 'attention_mask' (plus any nesting) for a key path into (args, kwargs)."""
    top, first, *rest = path
    head = f"args[{first.idx}]" if top.idx == 0 else str(first.key)
    return "'" + head + "".join(str(k) for k in rest) + "'"
