"""Capture: nn.Module / ExportedProgram / .pt2 file → torch.export → inference ExportedProgram → IR."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch
import torch.utils._pytree as pytree

from blade.errors import CaptureError, ConfigError, InputError
from blade.ir.graph import Graph
from blade.ir.serialize import is_size_arithmetic
from blade.frontend.signature import check_tensor_leaves
from blade.ir.structure import spec_to_json


@dataclass
class Captured:
    """What capture hands to the rest of the compiler."""

    graph: Graph
    exported: torch.export.ExportedProgram
    in_tree: dict  # structure of (args, kwargs)
    out_tree: dict
    arg_names: list[str]  # forward's parameter names, for binding calls by name
    example_args: tuple
    example_kwargs: dict
    reference: Callable  # the eager model (or the exported program): outputs; inputs cloned, buffers restored
    reference_outputs: list  # flat outputs on the example inputs, then the new values of what the graph mutates
    specialized: list[str] = field(default_factory=list)  # dims asked dynamic that came out static
    constants: dict[int, object] = field(default_factory=dict)  # input leaf index -> value torch.export specialised
    seconds: float = 0.0


def capture(model, example_inputs=(), example_kwargs=None, dynamic_shapes=None, name: str | None = None) -> Captured:
    """Export `model` for inference and import it into the IR."""
    start = time.perf_counter()
    if isinstance(model, (str, os.PathLike)):
        model = _load_pt2(model)
    if isinstance(model, torch.export.ExportedProgram):
        if dynamic_shapes is not None:
            raise ConfigError("dynamic_shapes cannot change an ExportedProgram (or .pt2): its dims were fixed "
                              "when it was exported — pass dynamic_shapes to torch.export.export instead")
        captured = _from_exported(model, example_inputs, example_kwargs, name)
    elif isinstance(model, torch.nn.Module):
        captured = _from_module(model, example_inputs, example_kwargs, dynamic_shapes, name)
    else:
        raise InputError(
            f"blade.compile takes an nn.Module, a torch.export.ExportedProgram or a .pt2 path, got "
            f"{type(model).__name__}; wrap a plain function in an nn.Module")
    captured.constants = constant_inputs(captured.exported)
    captured.specialized += [f"input {name} = {value!r} (a non-tensor input: a constant of the compiled model)"
                             for name, value in constant_names(captured.exported)]
    captured.seconds = time.perf_counter() - start
    return captured


def _user_input_specs(ep) -> list:
    from torch.export.graph_signature import InputKind

    return [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]


def constant_inputs(ep) -> dict[int, object]:
    """Input leaf index -> the value torch.export specialised a non-tensor input (a flag, a string) to."""
    from torch.export.graph_signature import ConstantArgument

    return {i: s.arg.value for i, s in enumerate(_user_input_specs(ep)) if isinstance(s.arg, ConstantArgument)
            and s.arg.value is not None}


def constant_names(ep) -> list[tuple[str, object]]:
    from torch.export.graph_signature import ConstantArgument

    return [(s.arg.name, s.arg.value) for s in _user_input_specs(ep) if isinstance(s.arg, ConstantArgument)
            and s.arg.value is not None]


def normalize_example(example_inputs, example_kwargs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise InputError(f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}")
    # None stands for an absent optional input: leave it to the model's default
    example_kwargs = {k: v for k, v in (example_kwargs or {}).items() if v is not None}
    check_tensor_leaves(example_inputs, example_kwargs, what="example input")
    return example_inputs, example_kwargs


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Put every submodule in eval mode for capture, then restore the user's flags."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _register_output_dataclasses(output) -> None:
    """torch.export needs dataclass outputs registered with pytree; do it for the user."""
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        if type(output) not in pytree.SUPPORTED_NODES:
            torch.export.register_dataclass(type(output))
        for f in dataclasses.fields(output):
            _register_output_dataclasses(getattr(output, f.name))
    elif isinstance(output, (list, tuple)):
        for item in output:
            _register_output_dataclasses(item)
    elif isinstance(output, dict):
        for item in output.values():
            _register_output_dataclasses(item)


def _drop_positional_none(model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Absent optional inputs given positionally as None: pass the ones after them by name."""
    if None not in args:
        return args, kwargs
    first = args.index(None)
    names = list(inspect.signature(model.forward).parameters)
    later = {names[i]: a for i, a in enumerate(args) if i > first and a is not None}
    return args[:first], {**later, **kwargs}


def functional(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program as blade's IR needs it: only functional ATen ops and size arithmetic.

    torch.export's default (training) IR already is that for most inference models; lowering it
    with run_decompositions({}) retraces the whole program (seconds on a BERT-base), so blade does
    it only when the graph holds an op that mutates its input or a higher-order op.
    """
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            if target._schema.is_mutable:
                return ep.run_decompositions({})
        elif not is_size_arithmetic(target):
            return ep.run_decompositions({})
    return ep


def bind_example(model, example_inputs, example_kwargs) -> tuple[tuple, dict]:
    """The example call as the module is captured with it (absent optional inputs left out)."""
    return _drop_positional_none(model, *normalize_example(example_inputs, example_kwargs))


def _from_module(model, example_inputs, example_kwargs, dynamic_shapes, name) -> Captured:
    args, kwargs = bind_example(model, example_inputs, example_kwargs)
    arg_names = list(inspect.signature(model.forward).parameters)
    flat_specs = flat_dim_specs(model, args, kwargs, dynamic_shapes)

    def call(*a, **k):
        with _eval_mode(model), torch.no_grad():
            return model(*a, **k)

    reference = Reference(call, lambda: dict(model.named_buffers()))
    reference_output, changed = reference.run(args, kwargs)
    with _eval_mode(model), torch.no_grad():
        _register_output_dataclasses(reference_output)
        ep = _export(model, args, kwargs, dynamic_shapes)
    ep = functional(ep)
    dim_names, specialized = name_dims(ep, flat_specs)
    graph = Graph.from_exported(ep, dim_names, name or type(model).__name__)
    out_tree = spec_to_json(ep.call_spec.out_spec)
    return Captured(graph, ep, spec_to_json(ep.call_spec.in_spec), out_tree, arg_names, args, kwargs, reference,
                    pytree.tree_leaves(reference_output) + mutated_values(graph, changed), specialized)


def _from_exported(ep, example_inputs, example_kwargs, name) -> Captured:
    if not example_inputs and not example_kwargs and getattr(ep, "example_inputs", None):
        example_inputs, example_kwargs = ep.example_inputs
    if not example_inputs and not example_kwargs:
        raise InputError("this ExportedProgram carries no example inputs: pass example_inputs to blade.compile")
    args, kwargs = normalize_example(example_inputs, example_kwargs)
    ep = functional(ep)
    _refuse_training_graph(ep)
    dim_names, _ = name_dims(ep, [None] * len(_user_input_nodes(ep)))
    graph = Graph.from_exported(ep, dim_names, name or "exported")
    module = ep.module()

    def call(*a, **k):
        with torch.no_grad():
            return module(*a, **k)

    reference = Reference(call, lambda: dict(module.named_buffers()))
    outputs, changed = reference.run(args, kwargs)
    signature = ep.module_call_graph[0].signature
    arg_names = list(getattr(signature, "forward_arg_names", None) or [])
    return Captured(graph, ep, spec_to_json(ep.call_spec.in_spec), spec_to_json(ep.call_spec.out_spec),
                    arg_names, args, kwargs, reference, pytree.tree_leaves(outputs) + mutated_values(graph, changed))


class Reference:
    """The eager model as a check sees it: each call runs on clones of the inputs and puts the model's buffers
    back as they were, so comparing with it never changes the caller's tensors or the model's state; `run`
    also returns what the call wrote (input leaves by flat index, buffers by name)."""

    def __init__(self, call: Callable, buffers: Callable[[], dict]):
        self.call, self.buffers = call, buffers

    def __call__(self, *args, **kwargs):
        return self.run(args, kwargs)[0]

    def run(self, args: tuple, kwargs: dict, watch: set[str] | None = None) -> tuple[Any, dict]:
        """(outputs, what the call wrote); `watch` names the buffers that may change (default: all of them, as
        before capture, when nobody knows yet)."""
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        clones = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        versions = [_version(leaf) if isinstance(leaf, torch.Tensor) else None for leaf in clones]
        buffers = {name: b for name, b in self.buffers().items() if watch is None or name in watch}
        saved = {name: (_version(b), b.clone()) for name, b in buffers.items()}
        call_args, call_kwargs = pytree.tree_unflatten(clones, spec)
        try:
            outputs = self.call(*call_args, **call_kwargs)
            written = {("input", i): leaf for i, (leaf, v) in enumerate(zip(clones, versions))
                       if isinstance(leaf, torch.Tensor) and (v is None or _version(leaf) != v)}
            written.update({("buffer", name): b.detach().clone() for name, b in buffers.items()
                            if saved[name][0] is None or _version(b) != saved[name][0]})
        finally:
            with torch.no_grad():
                for name, b in buffers.items():
                    if saved[name][0] is None or _version(b) != saved[name][0]:
                        b.copy_(saved[name][1])
        return outputs, {"written": written, "inputs": clones, "buffers": {k: v for k, (_, v) in saved.items()}}

    def flat(self, graph: Graph, args: tuple, kwargs: dict) -> list:
        """Flat outputs, then the new value of every input and buffer the graph mutates."""
        outputs, changed = self.run(args, kwargs, watch={graph.node(n).meta.get("source") for n in graph.state})
        return pytree.tree_leaves(outputs) + mutated_values(graph, changed)


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place write counter (None for an inference-mode tensor, which has none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def mutated_values(graph: Graph, changed: dict) -> list:
    """The values the eager call left in what the graph writes back, in graph.mutations order."""
    if not graph.mutations:
        return []
    tensor_leaves = [i for i, leaf in enumerate(changed["inputs"]) if isinstance(leaf, torch.Tensor)]
    user = [n.name for n in graph.user_inputs]
    values = []
    for name in graph.mutations:
        if name in graph.state:
            buffer = graph.node(name).meta.get("source")
            values.append(changed["written"].get(("buffer", buffer), changed["buffers"].get(buffer)))
        else:
            index = tensor_leaves[user.index(name)]
            values.append(changed["written"].get(("input", index), changed["inputs"][index]))
    return values


_TRAINING_ONLY = {"native_dropout", "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"}


def _refuse_training_graph(ep) -> None:
    """An ExportedProgram captured in training mode would run dropout at inference: refuse it."""
    for node in ep.graph.nodes:
        op = getattr(node.target, "_schema", None)
        name = op.name.split("::")[-1] if op is not None else ""
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if name in _TRAINING_ONLY and train is True:
            raise CaptureError(f"node {node.name} ({node.target}) runs in training mode: this program was "
                               "exported from a model in train mode — call model.eval() before torch.export")


def _load_pt2(path) -> torch.export.ExportedProgram:
    if not os.path.exists(path):
        raise InputError(f"{os.fspath(path)!r} does not exist (expected a .pt2 written by torch.export.save)")
    try:
        return torch.export.load(path)
    except Exception as exc:  # torch raises several kinds for a bad archive
        raise CaptureError(f"could not load {os.fspath(path)!r} as a torch.export .pt2: {exc}") from exc


def _export(model, args, kwargs, dynamic_shapes) -> torch.export.ExportedProgram:
    from torch._dynamo.exc import UserError, UserErrorType
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    try:
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    except GuardOnDataDependentSymNode as exc:
        raise CaptureError(_explain(exc, (
            "the model branches on a tensor's value (data-dependent control flow). Compute both sides "
            "and pick with torch.where, make the condition depend only on shapes or Python constants, or "
            "move the branch outside the model. (torch.cond captures, but blade's IR does not support it "
            "yet.)"))) from exc
    except UserError as exc:
        if exc.error_type == UserErrorType.CONSTRAINT_VIOLATION:
            raise CaptureError(_explain(exc, (
                "a dim you declared dynamic is fixed (or constrained) by the model's code. Use the range or "
                "the value torch suggests above, drop the dim from dynamic_shapes, or use Dim.AUTO to let "
                "torch decide."))) from exc
        if exc.error_type == UserErrorType.INVALID_INPUT:
            raise ConfigError(f"dynamic_shapes does not fit the inputs: {_reason(exc)}") from exc
        raise CaptureError(_explain(exc, _GENERIC_HINT)) from exc
    except Exception as exc:
        raise CaptureError(_explain(exc, _GENERIC_HINT)) from exc


_GENERIC_HINT = ("see torch.export's documentation for this failure; torch.export.draft_export(model, args) "
                 "lists every problem at once.")


def _reason(exc: BaseException, max_lines: int = 12) -> str:
    text = re.sub(r"\s*For more information[^:]*: \S+", "", str(exc))
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and "draft_export" not in ln]
    shown = lines[:max_lines] + (["..."] if len(lines) > max_lines else [])
    return "\n".join(shown)


def _explain(exc: BaseException, hint: str) -> str:
    return f"torch.export could not capture the model ({type(exc).__name__}):\n{_reason(exc)}\nhint: {hint}"


# -- dynamic dims ------------------------------------------------------------------------------

def _dim_label(d) -> str | None:
    """The name of a user's Dim (None for hints such as Dim.AUTO, and for derived dims)."""
    name = getattr(d, "__name__", None)
    return name if isinstance(name, str) and name.isidentifier() else None


def _is_static_request(d) -> bool:
    return d is torch.export.Dim.STATIC or isinstance(d, int)


def _per_axis(spec, where: str) -> dict[int, Any] | None:
    """One tensor's dynamic_shapes entry as {axis: Dim or hint}."""
    if spec is None:
        return None
    if isinstance(spec, dict):
        items = spec.items()
    elif isinstance(spec, (list, tuple)):
        items = enumerate(spec)
    else:
        raise ConfigError(f"dynamic_shapes for {where} must be a dict {{axis: Dim}}, a list per axis, or None; "
                          f"got {type(spec).__name__}")
    out = {}
    for axis, d in items:
        if not isinstance(axis, int):
            raise ConfigError(f"dynamic_shapes for {where}: axis {axis!r} is not an int")
        if d is not None:
            out[axis] = d
    return out


def _walk_specs(value, spec, where: str, out: list) -> None:
    if isinstance(value, torch.Tensor):
        axes = _per_axis(spec, where)
        if axes:
            bad = [a for a in axes if not -value.dim() <= a < value.dim()]
            if bad:
                raise ConfigError(f"dynamic_shapes for {where}: axis {bad[0]} is out of range for a "
                                  f"{value.dim()}-d input")
            axes = {a % value.dim(): d for a, d in axes.items()}
        out.append(axes)
    elif isinstance(value, (list, tuple)):
        specs = spec if isinstance(spec, (list, tuple)) else [None] * len(value)
        for i, item in enumerate(value):
            _walk_specs(item, specs[i] if i < len(specs) else None, f"{where}[{i}]", out)
    elif isinstance(value, dict):
        specs = spec if isinstance(spec, dict) else {}
        for key, item in value.items():
            _walk_specs(item, specs.get(key), f"{where}[{key!r}]", out)


def flat_dim_specs(model, args: tuple, kwargs: dict, dynamic_shapes) -> list:
    """The user's dynamic_shapes as one {axis: Dim} (or None) per tensor input, in flatten order."""
    if dynamic_shapes is None:
        return []
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    names = list(bound)
    if isinstance(dynamic_shapes, dict):
        unknown = [k for k in dynamic_shapes if k not in bound]
        if unknown:
            raise ConfigError(f"dynamic_shapes names {unknown}, which are not inputs of this call; "
                              f"the inputs are {names}")
        by_name = dict(dynamic_shapes)
    elif isinstance(dynamic_shapes, (list, tuple)):
        if len(dynamic_shapes) != len(names):
            raise ConfigError(f"dynamic_shapes has {len(dynamic_shapes)} entries but the call has "
                              f"{len(names)} inputs {names}; give one entry (or None) per input")
        by_name = dict(zip(names, dynamic_shapes))
    else:
        raise ConfigError(f"dynamic_shapes must be a dict keyed by input name, a tuple, or None; "
                          f"got {type(dynamic_shapes).__name__}")
    positional = names[:len(args)]
    out: list = []
    for arg_name, value in list(zip(positional, args)) + list(kwargs.items()):
        _walk_specs(value, by_name.get(arg_name), f"input '{arg_name}'", out)
    return out


def _user_input_nodes(ep) -> list[torch.fx.Node]:
    from torch.export.graph_signature import InputKind

    users = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    return [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in users]


def name_dims(ep, flat_specs: list) -> tuple[dict, list[str]]:
    """Map torch's shape symbols to the user's Dim names; list dims asked dynamic that specialized."""
    names: dict[sympy.Symbol, str] = {}
    taken: set[str] = set()
    specialized = []
    placeholders = _user_input_nodes(ep)
    for node, axes in zip(placeholders, list(flat_specs) + [None] * (len(placeholders) - len(flat_specs))):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for axis, size in enumerate(val.shape):
            wanted = (axes or {}).get(axis)
            expr = size.node.expr if isinstance(size, torch.SymInt) else None
            if expr is not None and not expr.is_Symbol and len(expr.free_symbols) == 1:
                root = getattr(wanted, "root", None)  # a derived Dim such as 2*d names its root d
                expr, wanted = next(iter(expr.free_symbols)), root if _dim_label(root) else None
            if expr is None or not expr.is_Symbol:
                if wanted is not None and not _is_static_request(wanted):
                    specialized.append(f"{node.name} axis {axis} ({_dim_label(wanted) or wanted}) = {size}")
                continue
            if expr in names:
                continue
            label = _dim_label(wanted)
            label = label if label and label not in taken else f"{node.name}_dim{axis}"
            names[expr] = label
            taken.add(label)
    return names, specialized
