"""The backend interface every backend implements, and the registry that finds them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from blade.errors import ConfigError
from blade.ir.graph import Graph, Node
from blade.target import Target


@runtime_checkable
class Executable(Protocol):
    """A compiled graph: called with the flat input tensors, returns the flat outputs."""

    def __call__(self, *tensors) -> list: ...

    def save(self, directory: str) -> None:
        """Write the backend's own files (the IR and weights are saved by the artifact)."""


@dataclass(frozen=True)
class RegionTiming:
    """One region as the backend's own profiler saw it; `nodes` joins it to the IR and its costs."""

    name: str
    engine: str  # "torch" or "onnxruntime"
    ops: tuple[str, ...]  # what ran: ATen ops or ONNX Runtime op types
    nodes: tuple[str, ...]  # the IR nodes it computes (none for runtime-only work such as shape ops)
    seconds: float  # median per call


@runtime_checkable
class Profiled(Protocol):
    """An executable that can time its own regions: profile(tensors, warmup, repeat) -> [RegionTiming]."""

    def profile(self, tensors: list, warmup: int, repeat: int) -> list[RegionTiming]: ...


@runtime_checkable
class Backend(Protocol):
    """name, supports(node), compile(graph, target, example_inputs) -> Executable, load(directory, graph, target)."""

    name: str

    def available(self, target: Target) -> bool: ...

    def supports(self, node: Node) -> bool: ...

    def compile(self, graph: Graph, target: Target, example_inputs=None) -> Executable:
        """example_inputs: flat tensors for backends that trace or export (they must not be needed to run)."""

    def load(self, directory: str, graph: Graph, target: Target) -> Executable: ...


def placement(graph: Graph, engine: str, device: str, attention_runs: str | None = None) -> dict:
    """Where the nodes run when `engine` runs the whole graph (no partition): every node on it, except
    blade::flash_attention, which runs the kernel the kernel registry picks on the device (or as `attention_runs`
    says, for an engine that lowers some of those calls itself)."""
    from blade.backends.kernels import registry
    from blade.ir.fused import calls_within
    from blade.ops.attention import FLASH_ATTENTION

    calls = calls_within(graph)
    attention = sum(1 for n in calls if n.target == FLASH_ATTENTION)
    nodes = {engine: len(calls) - attention}
    if attention:
        nodes[f"attention: {attention_runs or registry.describe('flash_attention', device)}"] = attention
    return {"nodes": nodes}


_REGISTRY: dict[str, Any] = {}
# backend="auto" prefers these in order (DESIGN.md: triton on CUDA, else onnxruntime), then eager.
AUTO_PREFERENCE = ("triton", "onnxruntime", "eager")
# backend="auto" with measurement compiles and times these (those available and able to run the graph)
MEASURED_CANDIDATES = ("triton", "onnxruntime", "inductor", "eager")


def register(backend) -> None:
    if not isinstance(backend, Backend):
        raise TypeError(f"{backend!r} does not implement the Backend interface")
    _REGISTRY[backend.name] = backend


def unregister(name: str) -> None:
    """Remove a registered backend (tests, plugins that go away); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str):
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; registered backends: {names()} (or 'auto')") from None


def resolve(name: str, target: Target) -> tuple[Any, str]:
    """The backend to use for `name` on `target`, and why it was chosen."""
    if name != "auto":
        backend = get(name)
        if not backend.available(target):
            reason = backend.unavailable_reason(target) + "; " if hasattr(backend, "unavailable_reason") else ""
            raise ConfigError(f"backend {name!r} cannot run on {target.describe()}: {reason}choose one of "
                              f"{[b for b in names() if _REGISTRY[b].available(target)]}")
        return backend, f"{name}: requested"
    skipped = []
    for candidate in AUTO_PREFERENCE:
        backend = _REGISTRY.get(candidate)
        if backend is None:
            skipped.append(f"{candidate} not registered")
        elif not getattr(backend, "auto_available", backend.available)(target):
            skipped.append(f"{candidate} unavailable on {target.device}")
        else:
            why = f"auto: {candidate}" + (f" ({'; '.join(skipped)})" if skipped else "")
            return backend, why
    raise ConfigError(f"no backend can run on {target.describe()}: {'; '.join(skipped)}")
