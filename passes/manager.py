"""The pass manager: runs a pipeline of passes and records what each one did."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

from blade.config import CompileConfig
from blade.errors import ConfigError, GraphError
from blade.ir.fused import verify_regions
from blade.ir.graph import Graph, map_graphs

Pass = Callable[[Graph, "PassContext"], Graph]
SKIP = "*"  # the site that names a whole pass in CompileConfig.held_back


@dataclass
class PassRecord:
    """What one pass did: its counters, notes, node counts and time."""

    name: str
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    counts: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)  # every rewrite the pass offered to commit, in order
    held_back: list[str] = field(default_factory=list)  # those the accuracy bisection kept out

    def as_dict(self) -> dict:
        data = {"name": self.name, "nodes_before": self.nodes_before, "nodes_after": self.nodes_after,
                "seconds": round(self.seconds, 6), "counts": dict(self.counts), "notes": list(self.notes)}
        if self.held_back:
            data["held_back"] = list(self.held_back)
        return data


@dataclass
class PassContext:
    """Handed to every pass: the user's config and the record the pass writes into."""

    config: CompileConfig
    record: PassRecord
    scope: str = ""  # where in the program: "" for the top graph, "cond.true_graph_0/" inside a nested one

    def count(self, key: str, n: int = 1) -> None:
        self.record.counts[key] += n

    def note(self, text: str) -> None:
        self.record.notes.append(f"in {self.scope.rstrip('/')}: {text}" if self.scope else text)

    def allows(self, site: str) -> bool:
        """Whether the pass may commit its rewrite at `site` (the name of the node it is anchored on, in the
        graph the pass was given). Every pass asks before it touches the graph for one rewrite; the accuracy
        bisection (blade/bisect.py) searches these sites for the one at fault and holds it back."""
        site = self.scope + site
        self.record.sites.append(site)
        if (self.record.name, site) in self.config.held_back:
            self.record.held_back.append(site)
            self.note(f"held back the rewrite at {site} (accuracy bisection)")
            return False
        return True


def _run_pass(fn: Pass, graph: Graph, ctx: PassContext) -> Graph:
    """The pass on the graph, then on every graph nested in it (torch.cond's branches, loop bodies), unless the
    pass is marked `top_level_only` (the lowering passes: their calibration and guard see the whole model)."""
    result = fn(graph, ctx)
    if not isinstance(result, Graph):
        raise GraphError(f"pass {ctx.record.name} returned {type(result).__name__}, not a Graph")
    if getattr(fn, "top_level_only", False):
        return result
    for node, _ in result.nested():
        def inside(nested: Graph, node=node) -> Graph:
            return _run_pass(fn, nested, replace(ctx, scope=f"{ctx.scope}{node.name}.{nested.name}/"))
        result.set_args(node, map_graphs(node.args, inside), map_graphs(node.kwargs, inside))
    return result


def pass_name(fn: Pass) -> str:
    module = getattr(fn, "__module__", "") or ""
    return module.rsplit(".", 1)[-1] if fn.__name__ == "run" else fn.__name__


def run_pipeline(graph: Graph, pipeline: list[Pass], config: CompileConfig) -> tuple[Graph, list[PassRecord]]:
    """Run each pass on a copy of the graph, in order; verify after each one in debug mode."""
    records = []
    graph = graph.copy()
    for fn in pipeline:
        if not callable(fn):
            raise ConfigError(f"pipeline entry {fn!r} is not a pass (a function graph, ctx -> graph)")
        record = PassRecord(pass_name(fn), nodes_before=len(graph))
        start = time.perf_counter()
        if (record.name, SKIP) in config.held_back:
            record.held_back.append(SKIP)
            record.notes.append("skipped: the accuracy bisection found this pass at fault")
            record.nodes_after = len(graph)
            records.append(record)
            continue
        graph = _run_pass(fn, graph, PassContext(config, record))
        record.seconds = time.perf_counter() - start
        record.nodes_after = len(graph)
        if config.debug:
            try:
                graph.verify()
                verify_regions(graph)
            except GraphError as exc:
                raise GraphError(f"after pass {record.name}: {exc}") from exc
        records.append(record)
    return graph, records
