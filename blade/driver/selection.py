"""Measured backend selection for backend="auto": compile the candidates, time them, keep the fastest.

The candidates are the backends auto may use on the target (Triton only on a CUDA GPU) that can run
the optimized graph at its precision (ONNX Runtime has no bf16 CPU matmul). Each is compiled in
preference order while the compile time spent so far is under the budget (the first always); one
whose outputs on the examples differ from eager's beyond the tolerance is left out; the rest are timed on the
example inputs interleaved (A B A B …, an untimed idle gap after each so that one engine's spinning
worker threads do not slow the next; a short call is timed in bursts of ~10 ms so that waking the
thread pool after the gap does not dominate it), median after warm-up. A candidate that fails to
compile or run is recorded with its error and left out. The report keeps every candidate's time.

A backend that optimizes a plain graph itself (ONNX Runtime) is measured twice where the compile allows it: on
blade's optimized graph and on the lightly optimized one (cleanup only), named "onnxruntime (light)". Where
blade's rewrites cost the backend more than they give (a fusion that hides a Conv from ONNX Runtime's NCHWc
layout), the light graph wins: a compile is never slower than the backend on its own, by measurement. In a
bf16/fp16 compile the alternative is the fp32 graph ("onnxruntime (fp32)"), for where no lowered candidate
beats ONNX Runtime in fp32.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from blade import backends, config
from blade.perf.accuracy import Accuracy
from blade.backends import base
from blade.backends.base import Backend, Executable
from blade.errors import BackendError
from blade.ir.graph import Graph
from blade.target import Target
from blade.perf.timing import sample_interleaved

DEFAULT_BUDGET_S = 120.0  # compile time the candidates after the first may take together
GAP_S = 0.1  # ONNX Runtime's worker threads spin for tens of ms after a run (bench/ort_cpu.py measured it)
WARMUP, MOST_REPEATS, TIMED_SECONDS, BURST_S = 2, 9, 3.0, 0.01
# Backends with graph optimizations of their own (ONNX Runtime's layout transformer, Conv fusions), which blade's
# rewrites can hide from them: these are also measured on the lightly optimized graph.
LIGHT_BACKENDS = ("onnxruntime",)


def enabled(asked: bool | None) -> bool:
    """blade.compile's `autotune` argument, else config.autotune() ($BLADE_AUTOTUNE)."""
    return asked if asked is not None else config.autotune()


@dataclass
class Selection:
    """The chosen backend and executable, and what every candidate measured."""

    backend: Backend
    executable: Executable
    reason: str
    candidates: dict = field(default_factory=dict)  # name -> {"ms", "compile_s"} or {"error"} or {"skipped"}
    accurate: bool = True  # False: every candidate missed the accuracy check; this one was compiled first
    light: bool = False  # the winner was compiled from the alternative (light or fp32) graph


def candidates_for(graph: Graph, target: Target) -> tuple[list, dict]:
    """(backends auto may measure, in preference order; {name: why not} for the others)."""
    found, skipped = [], {}
    for name in base.MEASURED_CANDIDATES:
        try:
            backend = backends.get(name)
        except Exception:  # noqa: BLE001 - not registered here
            continue
        if not backend.auto_available(target):
            skipped[name] = f"unavailable on {target.device}"
            continue
        refusal = backend.refuses(graph, target)
        if refusal:
            skipped[name] = refusal
            continue
        found.append(backend)
    return found, skipped


def select(graph: Graph, target: Target, examples: list, judge: Callable[[list], Accuracy] | None = None,
           budget_s: float = DEFAULT_BUDGET_S, light: Graph | None = None, label: str = "light") -> Selection:
    """Compile and time every candidate on `examples`; the fastest of those whose outputs the `judge` passes
    wins. `light`, an alternative graph named by `label` (the lightly optimized one, cleanup only, or a lowered
    compile's fp32 one), is a further candidate on the backends that optimize a plain graph themselves
    (LIGHT_BACKENDS): where blade's rewrites cost such a backend its own
    optimizations, the plain graph wins and the compile is never slower than the backend alone. When every
    candidate that ran misses, the first of them is returned with `accurate` False (the compile then bisects the
    passes on it)."""
    found, skipped = candidates_for(graph, target)
    results: dict[str, dict] = {name: {"skipped": why} for name, why in skipped.items()}
    tries = [(backend, graph, backend.name) for backend in found]
    if light is not None:  # the backends that take the light graph (an fp32 one may be refused the lowered graph)
        tries += [(backend, light, light_name(backend.name, label)) for backend in candidates_for(light, target)[0]
                  if backend.name in LIGHT_BACKENDS]
    compiled, spent, inaccurate = {}, 0.0, []
    for backend, candidate_graph, name in tries:
        if compiled and spent > budget_s:
            results[name] = {"skipped": f"compile-time budget of {budget_s:g} s spent"}
            continue
        start = time.perf_counter()
        try:
            executable = backend.compile(candidate_graph, target, example_inputs=examples)
            outputs = executable(*examples)  # the first call: lazy initialization, and it must run at all
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is reported, not fatal
            spent += time.perf_counter() - start
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            continue
        seconds = time.perf_counter() - start
        spent += seconds
        if judge is not None:
            accuracy = judge(outputs)
            if not accuracy.ok:
                results[name] = {"error": f"outputs differ from eager (rel_err {accuracy.rel_err:.3g})",
                                 "compile_s": seconds}
                if candidate_graph is graph:
                    inaccurate.append((backend, executable))
                continue
        compiled[name] = (backend, executable)
        results[name] = {"compile_s": seconds}
    if not compiled and inaccurate:
        backend, executable = inaccurate[0]
        return Selection(backend, executable, f"auto (measured): no candidate matched eager; {backend.name} "
                         "was bisected", results, accurate=False)
    if not compiled:
        raise BackendError(f"no candidate backend could compile {graph.name}: {results}")
    times = _time(compiled, examples, target.device)
    for name, seconds in times.items():
        results[name]["ms"] = seconds * 1e3
    best = min(times, key=times.get)
    ranking = " < ".join(f"{name} {times[name] * 1e3:.3g} ms" for name in sorted(times, key=times.get))
    backend, executable = compiled[best]
    won_light = best != backend.name
    if won_light:
        rivals = [name for name in times if name != best]
        what = "lightly optimized" if label == "light" else label
        ranking += (f"; the {what} graph won, {times[min(rivals, key=times.get)] / times[best]:.2f}x "
                    "the fastest other candidate" if rivals else f"; the {what} graph won")
    return Selection(backend, executable, f"auto (measured): {ranking}", results, light=won_light)


def light_name(backend: str, label: str = "light") -> str:
    """The candidate name of `backend` compiled from the alternative graph `label`."""
    return f"{backend} ({label})"


def _time(compiled: dict, examples: list, device: str) -> dict[str, float]:
    """Median seconds per call of each compiled candidate, interleaved with idle gaps; a sample is a burst of
    calls lasting about BURST_S, so that waking a thread pool after a gap does not dominate a short call."""
    firsts = {name: _once(executable, examples) for name, (_, executable) in compiled.items()}
    if len(compiled) == 1:  # nothing to compare: one call's time, for the report
        return firsts
    bursts = {name: max(1, int(BURST_S / max(first, 1e-6))) for name, first in firsts.items()}
    repeat = max(3, min(MOST_REPEATS, int(TIMED_SECONDS / max(sum(firsts[n] * bursts[n] for n in firsts), 1e-6))))
    calls = {}
    for name, (_, executable) in compiled.items():
        def burst(executable=executable, count=bursts[name]):
            for _ in range(count):
                executable(*examples)
        calls[name] = burst
        calls[f"_gap_{name}"] = lambda: time.sleep(GAP_S)
    samples = sample_interleaved(calls, warmup=WARMUP, repeat=repeat, device=device)
    return {name: statistics.median(samples[name]) / bursts[name] for name in compiled}


def _once(executable, examples: list) -> float:
    start = time.perf_counter()
    executable(*examples)
    return time.perf_counter() - start
