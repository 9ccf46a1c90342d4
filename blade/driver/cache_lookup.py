"""One compile's use of the compile cache: its key, a hit, or what storing the result did."""
from __future__ import annotations

import time

from blade.runtime import cache as compile_cache
from blade.runtime.compiled import CompiledModel
from blade.runtime.fingerprint import Unstable


class CacheLookup:
    """One compile's use of the cache: its key, a hit, or what storing the result did."""

    def __init__(self, asked: bool | None, options: dict, target):
        self.on, self.key, self.why_graph, self.why_off = compile_cache.enabled(asked), None, "", ""
        self.problem = ""  # why an existing entry could not be used
        self.target = target.as_dict()
        try:
            self.options = compile_cache.options_digest(options)
        except Unstable as exc:
            self.why_off = f"not cached: custom passes cannot be keyed ({exc})" if self.on else ""
            self.on = False

    def find(self, digest: str | None, start: float):
        """The cached model for `digest` (with the report saying so), else None; remembers the key."""
        if digest is None:
            return None
        t_key = time.perf_counter()
        self.key = compile_cache.make_key(digest, "", self.options, self.target)
        hit, self.problem = compile_cache.load(self.key)
        if hit is None:
            return None
        done = time.perf_counter()
        report = hit.report
        report.cache = {"hit": True, "key": self.key, "path": str(compile_cache.directory() / self.key),
                        "compiled_seconds": report.seconds}
        report.seconds = {"cache_key": t_key - start, "cache_load": done - t_key, "total": done - start}
        return hit

    def store(self, compiled: CompiledModel) -> None:
        """Cache a compile that passed its accuracy check; the report says what happened."""
        report = compiled.report
        if not self.on or self.key is None:
            if self.why_off or self.on:
                report.cache = {"hit": False, "key": None, "stored": self.why_off or "not cached: the graph has no "
                                "saved form to key it by"}
            return
        if report.accuracy is not None and not report.accuracy.ok:
            report.cache = {"hit": False, "key": self.key, "stored": "not cached: outputs differ from eager"}
            return
        t_store = time.perf_counter()
        try:
            path, what = compile_cache.store(compiled, self.key)
        except Exception as exc:  # noqa: BLE001 - a full or read-only disk costs the cache, never the compile
            path, what = None, f"not cached: {type(exc).__name__}: {exc}"
            report.warnings.append(f"compile cache: {what}")
        if self.problem:
            report.warnings.append(f"compile cache: {self.problem}")
        report.cache = {"hit": False, "key": self.key, "path": str(path) if path else None, "stored": what,
                        "keyed_by": f"captured graph ({self.why_graph})" if self.why_graph else "source"}
        report.seconds["cache_store"] = time.perf_counter() - t_store
