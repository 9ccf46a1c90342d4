"""Accuracy bisection: when a compile misses its tolerance, find the pass and the rewrite at fault and hold it back.

Every pass asks `ctx.allows(site)` before it commits one rewrite (a site is the name of the node the rewrite
is anchored on), so a compile can be repeated with any set of rewrites held back (CompileConfig.held_back).
The search, on the backend that shows the fault (the eager backend when it does too: compiling it is cheap):

1. the pass: the shortest prefix of the pipeline whose graph misses (binary search; the empty prefix, the
   captured graph itself, must pass, else no pass is at fault);
2. the rewrite: within that pass, the shortest prefix of its sites that misses with the rest held back
   (binary search; when even none of them passes, the pass's own ungated work is at fault: the pass is skipped);
3. the whole pipeline again with that rewrite held back, on the compile's backend: done when it passes, else the
   next culprit is searched, up to MAX_CULPRITS.

Only if nothing passes does the compile fall back to the unoptimized graph on the same backend, and only then to
the eager backend; a compile never fails because a pass was wrong. Each trial is one run of the passes, one
backend compile and one run on the example inputs, judged as the compile's own accuracy check judges.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

from blade import backends
from blade.perf.accuracy import Accuracy
from blade.config import CompileConfig
from blade.ir.graph import Graph
from blade.passes import run_pipeline
from blade.passes.manager import SKIP, PassRecord, pass_name

MAX_CULPRITS = 4


@dataclass
class Culprit:
    """One rewrite held back: the pass, its site ("*": the whole pass), the error with it and without it (the whole
    pipeline on the compile's backend, the culprits found before it held back too)."""

    pass_name: str
    site: str
    error_with: float
    error_without: float = float("nan")

    def as_dict(self) -> dict:
        return {"pass": self.pass_name, "site": self.site, "error_with": self.error_with,
                "error_without": self.error_without}


@dataclass
class Bisection:
    """What the bisection found and what the compile became."""

    error_before: float
    culprits: list[Culprit] = field(default_factory=list)
    outcome: str = ""  # "held back" | "unoptimized graph" | "eager backend" | "nothing passes"
    error_after: float = float("nan")
    backend: str = ""
    searched_on: str = ""
    trials: int = 0
    seconds: float = 0.0
    graph: Graph | None = None
    records: list[PassRecord] = field(default_factory=list)
    executable: object = None

    def outcome_text(self) -> str:
        return {"held back": f"held back {len(self.culprits)} rewrite(s) (see the bisection line)",
                "unoptimized graph": "found no rewrite to hold back: the unoptimized graph runs",
                "eager backend": "found no pass at fault: the unoptimized graph runs on the eager backend",
                "nothing passes": "found that even the unoptimized graph on the eager backend misses"}[self.outcome]

    def as_dict(self) -> dict:
        return {"error_before": self.error_before, "culprits": [c.as_dict() for c in self.culprits],
                "outcome": self.outcome, "error_after": self.error_after, "backend": self.backend,
                "searched_on": self.searched_on, "trials": self.trials, "seconds": round(self.seconds, 3)}


class _Search:
    """Trials of one bisection: passes run with some rewrites held back, compiled, judged."""

    def __init__(self, start: Graph, pipeline: list, config: CompileConfig, target, examples: list,
                 judge: Callable[[list], Accuracy]):
        self.start, self.pipeline, self.config = start, list(pipeline), config
        self.target, self.examples, self.judge = target, examples, judge
        self.trials = 0

    def passes(self, held: frozenset, stop: int | None = None, start: Graph | None = None, first: int = 0):
        """(graph, records) of pipeline[first:stop] from `start` (default: the captured graph)."""
        return run_pipeline(start if start is not None else self.start, self.pipeline[first:stop],
                            replace(self.config, held_back=held))

    def trial(self, graph: Graph, backend) -> tuple[Accuracy, object]:
        self.trials += 1
        executable = backend.compile(graph, self.target, example_inputs=self.examples)
        return self.judge(executable(*self.examples)), executable

    def ok(self, graph: Graph, backend) -> bool:
        return self.trial(graph, backend)[0].ok

    def culprit(self, held: frozenset, backend) -> tuple[str, str] | None:
        """(pass name, site) of the first rewrite at fault with `held` held back, or None when the captured
        graph itself misses on `backend`."""
        graphs, records = [self.start], []
        for index in range(len(self.pipeline)):
            graph, (record,) = self.passes(held, index + 1, graphs[-1], index)
            graphs.append(graph)
            records.append(record)
        if not self.ok(graphs[0], backend):
            return None
        good, bad = 0, len(self.pipeline)  # the prefix of `good` passes passes, that of `bad` misses
        while bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if self.ok(graphs[middle], backend) else (good, middle)
        index = bad - 1
        name = pass_name(self.pipeline[index])
        sites = [s for s in dict.fromkeys(records[index].sites) if (name, s) not in held]

        def allowing(count: int) -> Graph:
            hold = held | {(name, s) for s in sites[count:]}
            return self.passes(frozenset(hold), index + 1, graphs[index], index)[0]

        if not sites or not self.ok(allowing(0), backend):
            return name, SKIP
        good, bad = 0, len(sites)
        while bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if self.ok(allowing(middle), backend) else (good, middle)
        return name, sites[bad - 1]


def bisect(start: Graph, pipeline: list, config: CompileConfig, backend, target, examples: list,
           judge: Callable[[list], Accuracy], error_before: float) -> Bisection:
    """Find and hold back the rewrites that make the compile miss (see the module docstring)."""
    began = time.perf_counter()
    search = _Search(start, pipeline, config, target, examples, judge)
    result = Bisection(error_before=error_before, backend=backend.name)
    eager = backends.get("eager")
    held = frozenset(config.held_back)
    probe = backend
    if backend is not eager and not search.ok(search.passes(held)[0], eager):
        probe = eager  # the optimized graph itself is wrong: search with the cheap backend
    result.searched_on = probe.name
    error = error_before
    for _ in range(MAX_CULPRITS):
        found = search.culprit(held, probe)
        if found is None:
            if probe is backend:
                break
            probe = backend  # eager runs the captured graph right: the fault is in this backend's lowering
            result.searched_on = f"{eager.name}, then {backend.name}"
            found = search.culprit(held, probe)
            if found is None:
                break
        held = held | {found}
        result.culprits.append(Culprit(*found, error_with=error))
        graph, records = search.passes(held)
        accuracy, executable = search.trial(graph, backend)
        error = result.culprits[-1].error_without = accuracy.rel_err
        if accuracy.ok:
            return _done(result, "held back", graph, records, executable, error, search, began)
        if probe is eager and search.ok(graph, eager):
            probe = backend  # what was wrong in the graph is held back; the rest is the backend's
    for outcome, on, passes in (("unoptimized graph", backend, []), ("eager backend", eager, [])):
        graph, records = run_pipeline(start, passes, config)
        accuracy, executable = search.trial(graph, on)
        if accuracy.ok or on is eager:
            result.backend = on.name
            return _done(result, outcome if accuracy.ok else "nothing passes", graph, records, executable,
                         accuracy.rel_err, search, began)
    raise AssertionError("unreachable")


def _done(result: Bisection, outcome: str, graph: Graph, records: list, executable, error: float,
          search: _Search, began: float) -> Bisection:
    result.outcome, result.graph, result.records, result.executable = outcome, graph, records, executable
    result.error_after, result.trials, result.seconds = error, search.trials, time.perf_counter() - began
    return result
