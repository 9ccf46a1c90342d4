"""CompiledModel: the callable a compile returns (or an artifact loads)."""
from __future__ import annotations

import torch

from blade.errors import InputError
from blade.runtime.guards import check_inputs
from blade.ir.graph import Graph
from blade.perf.report import CompileReport
from blade.frontend.signature import Signature, check_tensor_leaves
from blade.target import Target


class CompiledModel:
    """Call it like the model: same arguments, same output structure.

    `.graph` is the optimized IR, `.report` the compile report, `.save(path)` writes an artifact.
    """

    def __init__(self, graph: Graph, executable, backend: str, target: Target, signature: Signature,
                 report: CompileReport, example_inputs: list[torch.Tensor] | None = None):
        self.graph = graph
        self.executable = executable
        self.backend = backend
        self.target = target
        self.signature = signature
        self.report = report
        self.example_inputs = example_inputs or []  # flat, saved with the artifact

    def flat_inputs(self, *args, **kwargs) -> list[torch.Tensor]:
        """Bind a call's arguments to the graph's inputs and check them against the spec."""
        check_tensor_leaves(args, kwargs)
        return self._checked(self.signature.flatten(args, kwargs))

    def _checked(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        check_inputs(self.graph.user_inputs, self.graph.dims, tensors)
        # the IR assumes dense inputs (torch.export traced contiguous examples): views rely on it
        return [t if t.is_contiguous() else t.contiguous() for t in tensors]

    def named_inputs(self, given: dict, source: str = "the inputs") -> list[torch.Tensor]:
        """The graph's inputs taken by name from `given` (a safetensors file, a server request), checked."""
        names = [n.name for n in self.graph.user_inputs]
        missing = [n for n in names if n not in given]
        if missing:
            raise InputError(f"{source} lacks input(s) {missing}; it must hold tensors named {names}")
        return self._checked([given[n] for n in names])

    def run_named(self, given: dict, source: str = "the inputs") -> list:
        """Run on inputs given by name; the flat outputs."""
        return self.run_flat(self.named_inputs(given, source))

    def run_flat(self, tensors: list[torch.Tensor], write_to: list[torch.Tensor] | None = None) -> list:
        """The outputs for the caller's flat tensors; what the program mutates is written back after the call: into
        `write_to` (the caller's own tensors, default `tensors`) and into the model's state."""
        graph = self.graph
        if not graph.mutations:
            return self.executable(*tensors)
        outputs = self.executable(*tensors, *graph.state_values())
        targets = dict(zip((n.name for n in graph.user_inputs), write_to if write_to is not None else tensors))
        targets.update(graph.state)
        count = graph.user_output_count
        with torch.no_grad():
            for name, value in zip(graph.mutations, outputs[count:]):
                if targets[name] is not value:
                    targets[name].copy_(value)
        return outputs[:count]

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The buffers the program mutates, as this compiled model holds them (its own copies: calls update these,
        not the module's)."""
        return {self.graph.node(name).meta.get("source") or name: t for name, t in self.graph.state.items()}

    def __call__(self, *args, **kwargs):
        check_tensor_leaves(args, kwargs)
        given = self.signature.flatten(args, kwargs)
        return self.signature.unflatten(self.run_flat(self._checked(given), write_to=given))

    def profile(self, *args, warmup: int = 3, repeat: int = 10, **kwargs):
        """Time every region on these inputs with the backend's profiler; a blade.runtime.profile.Profile with
        MFU and MBU per region and for the whole model (print it, .to_json(), .plot('roofline.svg'))."""
        from blade.runtime.profile import profile

        return profile(self, self.flat_inputs(*args, **kwargs), warmup=warmup, repeat=repeat)

    def save(self, path) -> None:
        """Write a self-contained artifact directory (manifest, IR, weights); see blade.load."""
        from blade.runtime.artifact import save

        save(self, path)

    def __repr__(self) -> str:
        return f"CompiledModel({self.graph.name}, backend={self.backend}, {len(self.graph)} nodes)"
