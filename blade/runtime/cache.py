"""The compile cache: artifacts on disk under a key of everything that decides a compile (written, then renamed)."""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import time
import uuid
from pathlib import Path

from blade import __version__
from blade import config
from blade.errors import BladeError
from blade.runtime.fingerprint import (Unstable, inputs_digest, module_digest, package_digest, path_digest,
                               user_code_digest, weights_digest, stable_value)

_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600  # a writer that died mid-write leaves its temporary directory; swept after this
_DEPENDENCIES = ("torch", "onnx", "onnxruntime", "onnxscript", "triton", "safetensors", "numpy", "sympy", "networkx")


def enabled(asked: bool | None) -> bool:
    """blade.compile's `cache` argument, else config.compile_cache() ($BLADE_CACHE)."""
    return asked if asked is not None else config.compile_cache()


def directory() -> Path:
    return config.cache_root() / "compiled"


def limit_bytes() -> int:
    """config.cache_max_gb() ($BLADE_CACHE_MAX_GB) in bytes: least recently used entries go beyond it."""
    return int(config.cache_max_gb() * 1e9)


def _blade_dirs() -> list[str]:
    """The folders of blade's four packages, found without importing them (the zoo stays unimported)."""
    return [path for name in ("blade", "blade.passes", "blade.backends", "blade.models")
            for path in importlib.util.find_spec(name).submodule_search_locations]


@functools.lru_cache(maxsize=1)
def versions() -> dict:
    """blade (its version and its source files), Python and every library a compile goes through."""
    found = {"blade": __version__, "python": platform.python_version(),
             "blade_source": [package_digest(path) for path in _blade_dirs()]}
    for name in _DEPENDENCIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def make_key(model_digest: str, inputs: str, options: dict, target: dict) -> str:
    data = {"model": model_digest, "inputs": inputs, "options": options, "versions": versions(), "target": target}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:40]


def source_digest(model, example_args, example_kwargs, dynamic_shapes) -> tuple[str | None, str]:
    """The model's digest before capture, or None (and why) when only the captured graph can key it."""
    import torch

    from blade.frontend.capture import normalize_example

    example_args, example_kwargs = normalize_example(example_args, example_kwargs)
    try:
        inputs = inputs_digest(example_args, example_kwargs, dynamic_shapes)
        if isinstance(model, (str, os.PathLike)):
            return f"pt2:{path_digest(str(model))}:{inputs}", ""
        if isinstance(model, torch.nn.Module):
            return f"module:{module_digest(model)}:{user_code_digest(skip=tuple(_blade_dirs()))}:{inputs}", ""
    except (Unstable, OSError) as exc:
        return None, str(exc)
    return None, f"a {type(model).__name__} is keyed by its captured graph"


def graph_digest(graph, signature: dict, example_args, example_kwargs) -> str | None:
    """The captured graph, its weights, its call signature (input/output structure and names) and the example
    inputs' specs, when the graph can be saved at all."""
    from blade.ir.serialize import graph_to_json

    try:
        data = graph_to_json(graph)
    except BladeError:
        return None
    return "graph:" + hashlib.sha256(json.dumps([data, signature], sort_keys=True, default=str).encode()).hexdigest() \
        + ":" + weights_digest(sorted(graph.constants.items()) + sorted(graph.state.items())) + ":" \
        + inputs_digest(example_args, example_kwargs, None)


def tensors_digest(data) -> str | None:
    """A digest of a nest of tensors and plain values (calibration data), None for None."""
    if data is None:
        return None
    import torch
    import torch.utils._pytree as pytree

    from blade.runtime.fingerprint import tensor_digests

    leaves, structure = pytree.tree_flatten(data)  # the structure names which input each tensor is
    digests = iter(tensor_digests([leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]))
    return _hash_text(json.dumps([str(structure)] + [next(digests) if isinstance(leaf, torch.Tensor) else repr(leaf)
                                                     for leaf in leaves]))


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def options_digest(options: dict) -> dict:
    """Compile options as stable values; custom passes by their code (Unstable when they have none)."""
    return {k: stable_value(v) if k == "passes" and v is not None else v for k, v in options.items()}


def load(key: str):
    """(the cached CompiledModel for `key` or None, what went wrong): an unreadable entry is removed."""
    from blade.runtime.artifact import load as load_artifact

    entry = directory() / key
    if not (entry / "manifest.json").is_file():
        return None, ""
    try:
        compiled = load_artifact(entry)
    except OSError as exc:  # another process is removing it (prune, clear): a miss, nothing to clean up
        return None, f"the cached entry vanished while loading ({exc})"
    except BladeError as exc:
        _remove(entry)
        return None, f"the cached entry could not be loaded and was removed ({exc})"
    try:
        os.utime(entry)  # last use, for eviction
    except OSError:
        pass
    return compiled, ""


def store(compiled, key: str) -> tuple[Path | None, str]:
    """Write `compiled` under `key`: into a private temporary directory, then one atomic rename.

    Concurrent writers of one key each write their own directory; the first rename wins and the
    others discard theirs, so readers only ever see complete entries.
    """
    from blade.runtime.artifact import save

    root = directory()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key
    if (entry / "manifest.json").is_file():
        return entry, "already cached"
    custom = sorted({op.split(".")[0] for op in compiled.graph.count_targets()} - _LOADABLE_NAMESPACES)
    if custom:
        return None, f"not cached: the graph calls custom operators ({', '.join(custom)}) that loading would trust"
    if entry.exists():  # a folder left without its manifest by an interrupted removal
        _remove(entry)
    temporary = _temporary(root, key)
    try:
        save(compiled, temporary)
        size = _size(temporary)
        if size > limit_bytes():
            _remove(temporary)
            return None, f"not cached: {size / 1e9:.2f} GB is over the cache limit (BLADE_CACHE_MAX_GB)"
        os.rename(temporary, entry)
    except BaseException:
        _remove(temporary)
        if (entry / "manifest.json").is_file():
            return entry, "another process cached it first"
        raise
    prune(keep=key)
    return entry, "stored"


# operator namespaces blade.load runs without being told to trust them (blade.ir.serialize's whitelist)
_LOADABLE_NAMESPACES = {"aten", "prims", "blade", "operator", "torch", "fused"}


def _temporary(root: Path, key: str) -> Path:
    return root / f"{_TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove(path: Path) -> None:
    """Take `path` out of view in one rename, then delete it: readers never see a half-removed entry."""
    try:
        doomed = _temporary(path.parent, path.name + "-removed")
        os.rename(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def entries() -> list[dict]:
    """Every complete entry: key, model, backend, target, size, when it was last used."""
    root = directory()
    found = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name.startswith(_TMP_PREFIX) or not (entry / "manifest.json").is_file():
            continue
        try:
            manifest = json.loads((entry / "manifest.json").read_text())
            report = manifest.get("report", {})
            found.append({"key": entry.name, "model": report.get("model"), "backend": manifest.get("backend"),
                          "target": manifest.get("target", {}).get("name"), "bytes": _size(entry),
                          "last_used": entry.stat().st_mtime, "path": str(entry)})
        except (OSError, ValueError, AttributeError):
            continue
    return found


def prune(keep: str | None = None) -> list[str]:
    """Drop least recently used entries until the cache fits its limit, and dead writers' leftovers."""
    root = directory()
    if not root.is_dir():
        return []
    now = time.time()
    for leftover in list(root.iterdir()):
        is_temporary = leftover.name.startswith(_TMP_PREFIX)
        if not is_temporary and (leftover / "manifest.json").is_file():
            continue
        try:  # a dead writer's temporary folder, or an entry an interrupted removal left without its manifest
            if now - leftover.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True) if is_temporary else _remove(leftover)
        except OSError:
            continue
    listed = sorted(entries(), key=lambda e: e["last_used"])
    total, removed = sum(e["bytes"] for e in listed), []
    for entry in listed:
        if total <= limit_bytes():
            break
        if entry["key"] == keep:
            continue
        _remove(Path(entry["path"]))
        total -= entry["bytes"]
        removed.append(entry["key"])
    return removed


def clear() -> int:
    """Remove every entry (and leftovers); the number of entries removed."""
    root = directory()
    count = len(entries())
    if root.is_dir():
        for child in list(root.iterdir()):
            _remove(child)
    return count
