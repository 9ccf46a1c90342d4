"""CompiledModel: the callable a compile returns (or an artifact loads)."""
from __future__ import annotations

import torch

from blade.errors import InputError
from blade.guards import check_inputs
from blade.ir import Graph
from blade.report import CompileReport
from blade.signature import Signature, check_tensor_leaves
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
        tensors = self.signature.flatten(args, kwargs)
        check_inputs(self.graph.inputs, self.graph.dims, tensors)
        # the IR assumes dense inputs (torch.export traced contiguous examples): views rely on it
        return [t if t.is_contiguous() else t.contiguous() for t in tensors]

    def named_inputs(self, given: dict, source: str = "the inputs") -> list[torch.Tensor]:
        """The graph's inputs taken by name from `given` (a safetensors file, a server request), checked."""
        names = [n.name for n in self.graph.inputs]
        missing = [n for n in names if n not in given]
        if missing:
            raise InputError(f"{source} lacks input(s) {missing}; it must hold tensors named {names}")
        tensors = [given[n] for n in names]
        check_inputs(self.graph.inputs, self.graph.dims, tensors)
        return [t if t.is_contiguous() else t.contiguous() for t in tensors]

    def run_named(self, given: dict, source: str = "the inputs") -> list:
        """Run on inputs given by name; the flat outputs."""
        return self.run_flat(self.named_inputs(given, source))

    def run_flat(self, tensors: list[torch.Tensor]) -> list:
        return self.executable(*tensors)

    def __call__(self, *args, **kwargs):
        return self.signature.unflatten(self.run_flat(self.flat_inputs(*args, **kwargs)))

    def profile(self, *args, warmup: int = 3, repeat: int = 10, **kwargs):
        """Time every region on these inputs with the backend's profiler; a blade.profile.Profile with
        MFU and MBU per region and for the whole model (print it, .to_json(), .plot('roofline.svg'))."""
        from blade.profile import profile

        return profile(self, self.flat_inputs(*args, **kwargs), warmup=warmup, repeat=repeat)

    def save(self, path) -> None:
        """Write a self-contained artifact directory (manifest, IR, weights); see blade.load."""
        from blade.artifact import save

        save(self, path)

    def __repr__(self) -> str:
        return f"CompiledModel({self.graph.name}, backend={self.backend}, {len(self.graph)} nodes)"
