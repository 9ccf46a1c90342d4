"""Stable hashes of what determines a compile: a module's code, attributes and weights, a captured graph, inputs."""
from __future__ import annotations

import enum
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.utils._pytree as pytree


class Unstable(Exception):
    """Something that decides the compile has no stable hash (a hook, an object without a source file)."""


def tensor_digests(tensors: list[torch.Tensor]) -> list[str]:
    """sha256 of each tensor's bytes (with dtype and shape), several at a time (hashlib releases the GIL)."""
    def digest(tensor: torch.Tensor) -> str:
        try:
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        except (RuntimeError, TypeError) as exc:  # quantized, sparse or meta tensors
            raise Unstable(f"a {tensor.dtype} {tensor.layout} tensor cannot be hashed: {exc}") from None
        hasher = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        hasher.update(memoryview(data))
        return hasher.hexdigest()

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(digest, tensors))


def weights_digest(named: list[tuple[str, torch.Tensor]]) -> str:
    """One hash of named tensors; a tensor shared under several names (tied weights) is hashed once."""
    first_name: dict[tuple, str] = {}
    distinct, layout = [], []
    for name, tensor in named:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype, tensor.device)
        if key in first_name and tensor.numel():
            layout.append((name, "=", first_name[key]))
        else:
            first_name[key] = name
            distinct.append(tensor)
            layout.append((name, "#", len(distinct) - 1))
    digests = tensor_digests(distinct)
    return _hash([(name, how, digests[ref] if how == "#" else ref) for name, how, ref in layout])


def _hash(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def file_digest(path: str) -> str:
    """sha256 of a source file's bytes (remembered while its size and mtime stay the same)."""
    stat = os.stat(path)
    return _file_digest(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths)


def user_code_digest(skip: tuple[str, ...] = ()) -> str:
    """The loaded Python files that are not installed packages or the standard library: the user's own code
    (scripts, a package under development). Any edit to them is a new key — a stale compile is never reused.
    Files under `skip` (blade's own packages, keyed by all their files) are left out."""
    files = []
    skipped = _installed_roots() + tuple(os.path.realpath(p) + os.sep for p in skip)
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        real = os.path.realpath(path)
        if real.startswith(skipped) or not os.path.isfile(real):
            continue
        files.append((real, file_digest(real)))
    return _hash(sorted(set(files)))


@functools.lru_cache(maxsize=None)
def _distribution_version(top_level: str) -> str | None:
    for dist in importlib.metadata.packages_distributions().get(top_level, []):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _class_code(cls: type) -> list:
    """What defines a module class's behaviour: its defining file and its package's version, over its MRO."""
    found = []
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in ("torch", "builtins"):
            continue  # torch's own classes are covered by the torch version in the key
        try:
            source = inspect.getsourcefile(klass)
        except TypeError:
            source = None
        if not source or not os.path.isfile(source):
            raise Unstable(f"class {klass.__qualname__} has no source file")
        found.append((klass.__module__, klass.__qualname__, file_digest(source),
                      _distribution_version(klass.__module__.split(".")[0])))
    return found


_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))


def stable_value(value, depth: int = 0, seen: frozenset = frozenset()):
    """A JSON-able stand-in for an attribute value, equal across processes exactly when the value is."""
    if depth > 6 or id(value) in seen:
        raise Unstable("attribute nests too deep or refers back to itself")
    seen = seen | {id(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return [type(value).__name__, value]
    if isinstance(value, (torch.dtype, torch.device, torch.Size, torch.memory_format, torch.layout)):
        return [type(value).__name__, str(value)]
    if isinstance(value, enum.Enum):
        return ["enum", type(value).__qualname__, str(value.value)]
    if isinstance(value, torch.Tensor):
        return ["tensor", tensor_digests([value])[0]]
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [stable_value(v, depth + 1, seen) for v in value]
        return [type(value).__name__, sorted(items, key=json.dumps) if isinstance(value, (set, frozenset)) else items]
    if isinstance(value, dict):
        return ["dict", sorted(([stable_value(k, depth + 1, seen), stable_value(v, depth + 1, seen)] for k, v in value.items()),
                               key=json.dumps)]
    if isinstance(value, type(min)) or isinstance(value, torch._ops.OpOverloadPacket):
        return ["builtin", getattr(value, "__module__", None), getattr(value, "__qualname__", str(value))]
    if inspect.isfunction(value) or inspect.ismethod(value):
        function = getattr(value, "__func__", value)
        closure = [stable_value(c.cell_contents, depth + 1, seen) for c in function.__closure__ or ()]
        source = inspect.getsourcefile(function)
        if not source or not os.path.isfile(source):
            raise Unstable(f"function {function.__qualname__} has no source file")
        return ["function", function.__module__, function.__qualname__, file_digest(source), closure]
    if hasattr(value, "__dict__") and not isinstance(value, type):
        # str hashes are salted per process, so an attribute that stores one (transformers' GenerationConfig
        # keeps `_original_object_hash`) differs in every process while meaning nothing to the compile
        fields = {k: v for k, v in vars(value).items() if "hash" not in k.lower()}
        return ["object", _class_code(type(value)), stable_value(fields, depth + 1, seen)]
    raise Unstable(f"attribute of type {type(value).__qualname__} has no stable hash")


def module_digest(model: torch.nn.Module) -> str:
    """Code, plain attributes, training flags and weights of every submodule; Unstable when hooks are set."""
    from torch.nn.modules import module as nn_module

    if any(getattr(nn_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        raise Unstable("global forward hooks are registered")
    parts = []
    for path, sub in model.named_modules(remove_duplicate=False):
        if sub._forward_hooks or sub._forward_pre_hooks:
            raise Unstable(f"submodule {path or '<root>'} has forward hooks")
        attributes = {k: v for k, v in vars(sub).items() if k not in _MODULE_INTERNALS}
        parts.append([path, _class_code(type(sub)), sub.training, stable_value(attributes)])
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return _hash([parts, weights_digest(named)])


def _dim_spec(value):
    """dynamic_shapes entries: torch.export Dims by name and range; the rest as stable values."""
    if hasattr(value, "min") and hasattr(value, "max") and hasattr(value, "__name__"):  # Dim, derived or not
        return ["Dim", str(value), value.__name__, value.min, value.max]
    if isinstance(value, (list, tuple)):
        return [_dim_spec(v) for v in value]
    if isinstance(value, dict):
        return sorted(([str(k), _dim_spec(v)] for k, v in value.items()), key=json.dumps)
    if hasattr(value, "__dict__") and not isinstance(value, type):  # derived dims, Dim hints
        return ["spec", type(value).__qualname__, str(value)]
    return stable_value(value)


def inputs_digest(example_args, example_kwargs, dynamic_shapes) -> str:
    """Shapes, dtypes and devices of the example tensors (not their values), other leaves by value, the tree."""
    leaves, spec = pytree.tree_flatten((tuple(example_args), dict(example_kwargs or {})))
    described = [["tensor", str(x.dtype), list(x.shape), x.device.type, x.requires_grad]
                 if isinstance(x, torch.Tensor) else stable_value(x) for x in leaves]
    return _hash([str(spec), described, _dim_spec(dynamic_shapes)])


def path_digest(path: str) -> str:
    """A saved program (.pt2) by its bytes."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            hasher.update(block)
    return hasher.hexdigest()


def package_digest(folder: str) -> str:
    """The source files under a package folder such as blade's own: an edit in development is a new key."""
    return _hash([(path.relative_to(folder).as_posix(), file_digest(str(path)))
                  for path in sorted(Path(folder).rglob("*.py"))])
