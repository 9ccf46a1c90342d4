"""Stable hashes of what determines a compile: a module's code, attributes and weights, a captured graph, inputs."""
from __future__ import annotations

import dis
import enum
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import sys
import sysconfig
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from blade import config


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


def file_digest(path: str) -> str:
    """sha256 of a source file's bytes (remembered while its stat stays the same and it is not just written)."""
    stat = os.stat(path)
    if time.time() - stat.st_mtime < 2.0:  # a coarse-mtime file system may not show an edit within its tick
        return path_digest(path)
    return _file_digest(path, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, *stat) -> str:
    return path_digest(path)


@functools.lru_cache(maxsize=1)
def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths)


def user_code_digest(skip: tuple[str, ...] = ()) -> str:
    """The live code of every loaded module that is not an installed package or the standard library: the
    user's own code (scripts, notebooks, a package under development), as it runs in this process — an edit,
    reloaded or not, never reuses a compile of other code. Modules under `skip` (blade's own) are left out."""
    digests = []
    for name, module in sorted(list(sys.modules.items()), key=lambda item: item[0]):
        path = getattr(module, "__file__", None)
        if name != "__main__" and (not path or not path.endswith(".py")):
            continue
        if path and not _is_user_file(path, skip):
            continue
        digests.append((name, module_code_digest(module, strict=False)))
    return _hash(digests)


# Code that compilers write and load as modules (Inductor's kernels, Triton's launchers, blade's own
# generated kernels): not the user's code, and new with every compile. Their default directories carry these
# marks; a directory set by the compilers' own variables is skipped too (_generated_roots).
_GENERATED = ("torchinductor_", f"{os.sep}triton{os.sep}", f"{os.sep}blade_triton_")


def _is_user_file(path: str, skip: tuple[str, ...]) -> bool:
    real = _real(path)
    if real.startswith(_skipped_prefixes(skip)) or any(mark in real for mark in _GENERATED):
        return False
    return not real.startswith(_generated_roots(config.compiler_cache_dirs()))


@functools.lru_cache(maxsize=8)
def _generated_roots(directories: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(os.path.realpath(d) + os.sep for d in directories)


@functools.lru_cache(maxsize=None)
def _real(path: str) -> str:
    return os.path.realpath(path)


@functools.lru_cache(maxsize=None)
def _skipped_prefixes(skip: tuple[str, ...]) -> tuple[str, ...]:
    return _installed_roots() + tuple(os.path.realpath(p) + os.sep for p in skip)


@functools.lru_cache(maxsize=None)
def _distribution_version(top_level: str) -> str | None:
    """The installed distribution's version: by the package's own name, else by scanning (slow, rare)."""
    try:
        return f"{top_level} {importlib.metadata.version(top_level)}"
    except (importlib.metadata.PackageNotFoundError, ValueError):
        pass
    for dist in importlib.metadata.packages_distributions().get(top_level, []):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def code_digest(code: types.CodeType) -> str:
    """A code object's bytecode, names and constants (nested code too); not its line numbers or file."""
    def const(value):
        if isinstance(value, types.CodeType):
            return ["code", code_digest(value)]
        if isinstance(value, (tuple, list)):
            return [type(value).__name__, [const(v) for v in value]]
        if isinstance(value, (frozenset, set)):  # iteration order follows salted str hashes
            return [type(value).__name__, sorted(json.dumps(const(v)) for v in value)]
        return [type(value).__name__, repr(value)]

    return _hash([code.co_name, code.co_code.hex(), code.co_names, code.co_varnames, code.co_freevars,
                  code.co_cellvars, code.co_flags, code.co_argcount, code.co_kwonlyargcount,
                  [const(c) for c in code.co_consts]])


def _callable_value(value, depth: int, seen: frozenset):
    """Functions, methods, partials and builtins by what they run and what they are bound to."""
    if isinstance(value, functools.partial):
        return ["partial", stable_value(value.func, depth + 1, seen), stable_value(value.args, depth + 1, seen),
                stable_value(value.keywords, depth + 1, seen)]
    if inspect.ismethod(value):
        return ["method", stable_value(value.__func__, depth + 1, seen), stable_value(value.__self__, depth + 1, seen)]
    if inspect.isfunction(value):
        closure = [stable_value(c.cell_contents, depth + 1, seen) for c in value.__closure__ or ()]
        return ["function", value.__module__, value.__qualname__, code_digest(value.__code__),
                stable_value(value.__defaults__, depth + 1, seen), stable_value(value.__kwdefaults__, depth + 1, seen),
                closure]
    if isinstance(value, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return ["op", str(value)]
    if isinstance(value, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        bound = getattr(value, "__self__", None)
        if bound is not None and not isinstance(bound, types.ModuleType):
            raise Unstable(f"builtin method {value.__qualname__} is bound to a {type(bound).__qualname__}")
        return ["builtin", getattr(value, "__module__", None), value.__qualname__]
    return None


def _class_body(cls: type, depth: int) -> list:
    """A class as defined now: its methods' code and defaults, its plain class attributes, nested classes."""
    items = []
    for key, value in sorted(vars(cls).items(), key=lambda item: item[0]):
        if key in ("__dict__", "__weakref__", "__doc__", "__module__", "__qualname__", "__annotations__"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            value = [value.fget, value.fset]
        items.append([key, _definition(value, cls.__module__, depth + 1)])
    return items


def _definition(value, module_name: str, depth: int):
    """A module global or class attribute: code where it is code defined here, values where plain, else its kind."""
    if isinstance(value, list):
        return [_definition(v, module_name, depth) for v in value]
    if inspect.isfunction(value):
        return ["function", code_digest(value.__code__), _safe(value.__defaults__), _safe(value.__kwdefaults__)]
    if inspect.isclass(value):
        if value.__module__ == module_name and depth < 4:
            return ["class", _class_body(value, depth)]
        return ["class", value.__module__, value.__qualname__]
    if isinstance(value, types.ModuleType):
        return ["module", value.__name__]
    return _safe(value)


def _safe(value, depth: int = 0):
    """A plain value as itself (containers walked); anything else by its kind and type name — its own
    definition is keyed where it is defined, so nothing here recurses into other modules."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return [type(value).__name__, value]
    if isinstance(value, (torch.dtype, torch.device, enum.Enum)):
        return [type(value).__qualname__, str(value)]
    if depth < 4 and isinstance(value, (tuple, list)):
        return [type(value).__name__, [_safe(v, depth + 1) for v in value]]
    if depth < 4 and isinstance(value, (frozenset, set)):
        return [type(value).__name__, sorted(json.dumps(_safe(v, depth + 1)) for v in value)]
    if depth < 4 and isinstance(value, dict):
        return ["dict", sorted(json.dumps([_safe(k, depth + 1), _safe(v, depth + 1)]) for k, v in value.items())]
    if inspect.isclass(value) or inspect.isfunction(value):
        return ["ref", value.__module__, value.__qualname__]
    if isinstance(value, (types.BuiltinFunctionType, types.BuiltinMethodType)):  # torch.tanh, F.gelu: by name
        return ["builtin", getattr(value, "__module__", None), value.__qualname__]
    return ["instance", type(value).__module__, type(value).__qualname__]


def module_code_digest(module: types.ModuleType, values: bool = True, strict: bool = True) -> str:
    """A Python module as it is loaded now: its functions' and classes' code, and (with `values`) the globals that
    code reads (a script's other globals, such as a timer's value, do not matter to a compile). Installed
    packages are keyed without values: they hold per-process ones (transformers' SESSION_ID). With `strict` (a
    module defining the model's classes) a global is keyed by its state (objects by their fields, tensors by their
    bytes; Unstable without a stable hash); else (the user's other loaded modules, keyed so that an edit misses)
    by plain values and the kinds of the rest, which keeps a compile from hashing every tensor a notebook holds."""
    name = module.__name__
    namespace = dict(vars(module))
    items, read = [], set()
    for key, value in sorted(namespace.items(), key=lambda item: item[0]):
        if key.startswith("__") and key.endswith("__"):
            continue
        if inspect.isfunction(value) or inspect.isclass(value):
            if getattr(value, "__module__", None) != name:
                items.append([key, "imported", getattr(value, "__module__", None), getattr(value, "__qualname__", None)])
                continue
            items.append([key, _definition(value, name, 0)])
            read |= _names_read(value)
    for key in sorted(read) if values else ():
        value = namespace.get(key)
        if key in namespace and not (inspect.isfunction(value) or inspect.isclass(value)):
            items.append([key, _global_value(value, name) if strict else _definition(value, name, 0)])
    return _hash(items)


def _global_value(value, module_name: str, depth: int = 0):
    """A global the user's code reads, by its state: definitions as _definition keys them, containers walked,
    tensors and arrays by their bytes, objects by their fields; Unstable for anything else (a generator,
    a handle), so that the compile is keyed by its captured graph instead of by a name that hides a value."""
    if depth > 6:
        raise Unstable(f"global of {module_name} nests too deep to hash")
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device, enum.Enum)) \
            or inspect.isfunction(value) or inspect.isclass(value) or isinstance(value, types.ModuleType) \
            or isinstance(value, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        return _definition(value, module_name, 0) if not isinstance(value, bytes) else ["bytes", value.hex()]
    if isinstance(value, torch.Tensor):
        return ["tensor", tensor_digests([value])[0]]
    if type(value).__module__ == "numpy" and hasattr(value, "tobytes"):
        return ["ndarray", str(getattr(value, "dtype", "")), list(getattr(value, "shape", ())),
                hashlib.sha256(value.tobytes()).hexdigest()]
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [_global_value(v, module_name, depth + 1) for v in value]]
    if isinstance(value, (set, frozenset)):
        return [type(value).__name__, sorted(json.dumps(_global_value(v, module_name, depth + 1)) for v in value)]
    if isinstance(value, dict):
        return ["dict", sorted(json.dumps([_global_value(k, module_name, depth + 1),
                                           _global_value(v, module_name, depth + 1)]) for k, v in value.items())]
    if isinstance(value, functools.partial) or inspect.ismethod(value):
        return _callable_value(value, depth, frozenset())
    if hasattr(type(value), "__members__") and isinstance(getattr(value, "name", None), str):  # a pybind11 enum
        return ["enum", type(value).__module__, type(value).__qualname__, value.name]
    if hasattr(value, "__dict__"):
        return ["object", type(value).__module__, type(value).__qualname__,
                _global_value({k: v for k, v in vars(value).items() if k not in _PER_PROCESS_FIELDS}, module_name,
                              depth + 1)]
    raise Unstable(f"global of {module_name} of type {type(value).__qualname__} has no stable hash")


def _names_read(definition) -> set[str]:
    """Global names the code of a function or class (its methods, nested code) refers to."""
    codes = []
    if inspect.isfunction(definition):
        codes.append(definition.__code__)
    else:
        for value in vars(definition).values():
            value = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if isinstance(value, property):
                codes += [f.__code__ for f in (value.fget, value.fset) if inspect.isfunction(f)]
            elif inspect.isfunction(value):
                codes.append(value.__code__)
    names: set[str] = set()
    while codes:
        code = codes.pop()
        # the names loaded as globals, not attribute names (co_names mixes both: `self.model` is not the
        # notebook's global `model`)
        names.update(i.argval for i in dis.get_instructions(code) if i.opname in _GLOBAL_LOADS)
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return names


_GLOBAL_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"})


def _class_code(cls: type, memo: dict) -> list:
    """What defines a class's behaviour, over its MRO: each class's module and qualified name, the live code of
    the module that defines it (its helpers too) and, for an installed package (torch included), its version.
    A package's version alone never names a class: two parameterless modules of one package differ by this."""
    found = []
    for klass in cls.__mro__:
        module_name = klass.__module__
        if module_name == "builtins":
            continue
        if module_name not in memo:
            module = sys.modules.get(module_name)
            if module is None:
                raise Unstable(f"class {klass.__qualname__} comes from module {module_name}, which is not loaded")
            path = getattr(module, "__file__", None)
            user = not path or _is_user_file(path, ())
            # installed code is keyed by its version too; the user's own by its live code alone
            memo[module_name] = (module_code_digest(module, values=user),
                                 None if user else _distribution_version(module_name.split(".")[0]))
        found.append((module_name, klass.__qualname__, *memo[module_name]))
    return found


_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))
# fields that hold a per-process value (a salted str hash) and mean nothing to a compile
_PER_PROCESS_FIELDS = frozenset({"_original_object_hash", "_commit_hash"})


def stable_value(value, depth: int = 0, seen: frozenset = frozenset(), memo: dict | None = None):
    """A JSON-able stand-in for an attribute value, equal across processes exactly when the value is."""
    if depth > 8 or id(value) in seen:
        raise Unstable("attribute nests too deep or refers back to itself")
    seen = seen | {id(value)}
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return [type(value).__name__, value if not isinstance(value, bytes) else value.hex()]
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
        return ["dict", sorted(([stable_value(k, depth + 1, seen), stable_value(v, depth + 1, seen)]
                                for k, v in value.items()), key=json.dumps)]
    as_callable = _callable_value(value, depth, seen)
    if as_callable is not None:
        return as_callable
    if isinstance(value, type):
        return ["class", _class_code(value, memo if memo is not None else {})]
    if hasattr(value, "__dict__"):
        fields = {k: v for k, v in vars(value).items() if k not in _PER_PROCESS_FIELDS}
        return ["object", _class_code(type(value), memo if memo is not None else {}),
                stable_value(fields, depth + 1, seen)]
    raise Unstable(f"attribute of type {type(value).__qualname__} has no stable hash")


@functools.lru_cache(maxsize=1)
def _settle_dynamo_patch() -> None:
    """Install now the patch of torch.nn.Module.__init__/__setstate__ that dynamo installs at the first
    torch.compile of a process (its generation tagging), so that torch.nn.Module's code is keyed the same before
    and after one: else a model's first compile in a process misses the cache of every later one. Idempotent;
    where this torch has no such hook, nothing."""
    try:
        from torch._dynamo.mutation_guard import install_generation_tagging_init
    except ImportError:
        return
    install_generation_tagging_init()


def module_digest(model: torch.nn.Module) -> str:
    """Code, plain attributes, training flags and weights of every submodule; Unstable when hooks are set."""
    from torch.nn.modules import module as nn_module

    _settle_dynamo_patch()
    if any(getattr(nn_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        raise Unstable("global forward hooks are registered")
    parts, memo = [], {}
    for path, sub in model.named_modules(remove_duplicate=False):
        if sub._forward_hooks or sub._forward_pre_hooks:
            raise Unstable(f"submodule {path or '<root>'} has forward hooks")
        attributes = {k: v for k, v in vars(sub).items() if k not in _MODULE_INTERNALS}
        parts.append([path, _class_code(type(sub), memo), sub.training, stable_value(attributes, memo=memo)])
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


def path_digest(path) -> str:
    """sha256 of a file's bytes, read in blocks (a saved program, an artifact's files)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            hasher.update(block)
    return hasher.hexdigest()


def package_digest(folder: str) -> str:
    """The source files under a package folder such as blade's own: an edit in development is a new key."""
    return _hash([(path.relative_to(folder).as_posix(), file_digest(str(path)))
                  for path in sorted(Path(folder).rglob("*.py"))])
