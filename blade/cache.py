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
from blade.config import cache_root
from blade.errors import BladeError, ConfigError
from blade.fingerprint import (Unstable, inputs_digest, module_digest, package_digest, path_digest,
                               user_code_digest, weights_digest, stable_value)

DEFAULT_LIMIT_GB = 20.0
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600  # a writer that died mid-write leaves its temporary directory; swept after this
_DEPENDENCIES = ("torch", "onnx", "onnxruntime", "onnxscript", "triton", "safetensors", "numpy", "sympy", "networkx")


def enabled(asked: bool | None) -> bool:
    """blade.compile's `cache` argument, else $BLADE_CACHE ('0' turns it off); on by default."""
    return asked if asked is not None else os.environ.get("BLADE_CACHE", "1") != "0"


def directory() -> Path:
    return cache_root() / "compiled"


def limit_bytes() -> int:
    """$BLADE_CACHE_MAX_GB (default 20): least recently used entries go beyond it."""
    text = os.environ.get("BLADE_CACHE_MAX_GB", str(DEFAULT_LIMIT_GB))
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"BLADE_CACHE_MAX_GB={text!r} is not a number of gigabytes") from None
    return int(value * 1e9)


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

    try:
        inputs = inputs_digest(example_args, example_kwargs, dynamic_shapes)
        if isinstance(model, (str, os.PathLike)):
            return f"pt2:{path_digest(str(model))}:{inputs}", ""
        if isinstance(model, torch.nn.Module):
            return f"module:{module_digest(model)}:{user_code_digest(skip=tuple(_blade_dirs()))}:{inputs}", ""
    except (Unstable, OSError) as exc:
        return None, str(exc)
    return None, f"a {type(model).__name__} is keyed by its captured graph"


def graph_digest(graph) -> str | None:
    """The captured graph and its weights, when they can be saved at all."""
    from blade.serialize import graph_to_json

    try:
        data = graph_to_json(graph)
    except BladeError:
        return None
    return "graph:" + hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest() + ":" + \
        weights_digest(sorted(graph.constants.items()))


def options_digest(options: dict) -> dict:
    """Compile options as stable values; custom passes by their code (Unstable when they have none)."""
    return {k: stable_value(v) if k == "passes" and v is not None else v for k, v in options.items()}


def load(key: str):
    """(the cached CompiledModel for `key` or None, what went wrong): an unreadable entry is removed."""
    from blade.artifact import load as load_artifact

    entry = directory() / key
    if not (entry / "manifest.json").is_file():
        return None, ""
    try:
        compiled = load_artifact(entry)
    except BladeError as exc:
        shutil.rmtree(entry, ignore_errors=True)
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
    from blade.artifact import save

    root = directory()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key
    if (entry / "manifest.json").is_file():
        return entry, "already cached"
    temporary = root / f"{_TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        save(compiled, temporary)
        size = _size(temporary)
        if size > limit_bytes():
            shutil.rmtree(temporary, ignore_errors=True)
            return None, f"not cached: {size / 1e9:.2f} GB is over the cache limit (BLADE_CACHE_MAX_GB)"
        os.rename(temporary, entry)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        if (entry / "manifest.json").is_file():
            return entry, "another process cached it first"
        raise
    prune(keep=key)
    return entry, "stored"


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
    for leftover in root.glob(f"{_TMP_PREFIX}*"):
        try:
            if now - leftover.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue
    listed = sorted(entries(), key=lambda e: e["last_used"])
    total, removed = sum(e["bytes"] for e in listed), []
    for entry in listed:
        if total <= limit_bytes():
            break
        if entry["key"] == keep:
            continue
        shutil.rmtree(entry["path"], ignore_errors=True)
        total -= entry["bytes"]
        removed.append(entry["key"])
    return removed


def clear() -> int:
    """Remove every entry (and leftovers); the number of entries removed."""
    root = directory()
    count = len(entries())
    if root.is_dir():
        for child in root.iterdir():
            shutil.rmtree(child, ignore_errors=True)
    return count
