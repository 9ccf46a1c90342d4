"""The backend interface every backend implements, and the registry that finds them."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from blade.errors import BackendError, ConfigError
from blade.ir.graph import Graph, Node
from blade.target import Target


@dataclass(frozen=True)
class RegionTiming:
    """One region as the backend's own profiler saw it; `nodes` joins it to the IR and its costs."""

    name: str
    engine: str  # "torch" or "onnxruntime"
    ops: tuple[str, ...]  # what ran: ATen ops or ONNX Runtime op types
    nodes: tuple[str, ...]  # the IR nodes it computes (none for runtime-only work such as shape ops)
    seconds: float  # median per call


class Executable(ABC):
    """A compiled graph: called with the flat input tensors, returns the flat outputs.

    Beyond running and saving, an executable may describe where its nodes run, name the target properties its
    code depends on, show its generated source, time its own regions and write itself as one ONNX model. Each of
    those has a default here (nothing to say, or a BackendError naming the backend); a backend overrides what it
    has, and says so with has_profiler() / exports_onnx() where a caller must know before it starts.
    """

    backend: ClassVar[str] = ""  # the name of the backend that compiles it, for messages

    @abstractmethod
    def __call__(self, *tensors) -> list: ...

    @abstractmethod
    def save(self, directory: str) -> None:
        """Write the backend's own files (the IR and weights are saved by the artifact)."""

    def describe(self) -> dict:
        """Where the nodes run and anything else the compile report and the manifest show about it."""
        return {}

    def requires(self) -> dict:
        """The target properties its code depends on ({"arch": ..., "features": [...]}); {} when portable."""
        return {}

    def sources(self) -> str | None:
        """The code it generated, for reading (blade inspect --source); None when it generates none."""
        return None

    def has_profiler(self) -> bool:
        """Whether profile() can time its regions."""
        return False

    def profile(self, tensors: list, warmup: int, repeat: int) -> list[RegionTiming]:
        """Each region's median time over `repeat` calls after `warmup` on the flat `tensors`."""
        raise BackendError(f"backend {self.backend!r} has no profiler; profile with backend='eager' or 'onnxruntime'")

    def exports_onnx(self) -> bool:
        """Whether to_onnx() can write the whole graph as one plain .onnx."""
        return False

    def to_onnx(self, path) -> None:
        """Write the whole graph as one plain .onnx at `path` (weights in `<path>.data`)."""
        raise BackendError(f"backend {self.backend!r} does not lower to ONNX; compile with backend='onnxruntime'")


class Backend(ABC):
    """Turns the IR into an Executable for a target, and loads one back from an artifact.

    available, supports, compile and load are what every backend implements. auto_available, unavailable_reason
    and refuses have defaults (auto may use it wherever it is available; no reason to add; it refuses no graph).
    """

    name: ClassVar[str]

    @abstractmethod
    def available(self, target: Target) -> bool:
        """Whether it can run on `target` at all."""

    @abstractmethod
    def supports(self, node: Node) -> bool:
        """Whether it runs `node` itself (a partitioning backend sends the others to PyTorch)."""

    @abstractmethod
    def compile(self, graph: Graph, target: Target, example_inputs=None) -> Executable:
        """example_inputs: flat tensors for backends that trace or export (they must not be needed to run)."""

    @abstractmethod
    def load(self, directory: str, graph: Graph, target: Target) -> Executable:
        """The executable an artifact saved in `directory` (its backend folder) for `graph`."""

    def auto_available(self, target: Target) -> bool:
        """Whether backend="auto" may pick it on `target` (by the fixed rule or by measurement)."""
        return self.available(target)

    def unavailable_reason(self, target: Target) -> str:
        """Why it is not available on `target`, for the error; "" when there is nothing to add."""
        return ""

    def refuses(self, graph: Graph, target: Target) -> str | None:
        """Why measured selection should not try it on `graph` (None: it may)."""
        return None


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


_REGISTRY: dict[str, Backend] = {}
# backend="auto" prefers these in order (DESIGN.md: triton on CUDA, else onnxruntime), then eager.
AUTO_PREFERENCE = ("triton", "onnxruntime", "eager")
# backend="auto" with measurement compiles and times these (those available and able to run the graph)
MEASURED_CANDIDATES = ("triton", "onnxruntime", "inductor", "eager")


def register(backend: Backend) -> None:
    if not isinstance(backend, Backend):
        raise TypeError(f"{backend!r} does not implement the Backend interface")
    _REGISTRY[backend.name] = backend


def unregister(name: str) -> None:
    """Remove a registered backend (tests, plugins that go away); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; registered backends: {names()} (or 'auto')") from None


def resolve(name: str, target: Target) -> tuple[Backend, str]:
    """The backend to use for `name` on `target`, and why it was chosen."""
    if name != "auto":
        backend = get(name)
        if not backend.available(target):
            reason = backend.unavailable_reason(target)
            raise ConfigError(f"backend {name!r} cannot run on {target.describe()}: {f'{reason}; ' if reason else ''}"
                              f"choose one of {[b for b in names() if _REGISTRY[b].available(target)]}")
        return backend, f"{name}: requested"
    skipped = []
    for candidate in AUTO_PREFERENCE:
        backend = _REGISTRY.get(candidate)
        if backend is None:
            skipped.append(f"{candidate} not registered")
        elif not backend.auto_available(target):
            skipped.append(f"{candidate} unavailable on {target.device}")
        else:
            why = f"auto: {candidate}" + (f" ({'; '.join(skipped)})" if skipped else "")
            return backend, why
    raise ConfigError(f"no backend can run on {target.describe()}: {'; '.join(skipped)}")
