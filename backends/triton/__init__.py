"""The Triton backend: generated kernels for fused regions in a host program (blade.backends.kernels holds the
hand-written Triton kernels, FlashAttention and the quantized GEMMs, which blade's ops use on CUDA)."""
from __future__ import annotations

import importlib.util

from blade import config
from blade.backends.base import Backend
from blade.errors import BackendError
from blade.ir.graph import Graph, Node
from blade.target import Target


class TritonBackend(Backend):
    """backend="triton": the default on a CUDA GPU with Triton; on CPU only under TRITON_INTERPRET=1 (tests)."""

    name = "triton"

    def available(self, target: Target) -> bool:
        if importlib.util.find_spec("triton") is None:
            return False
        return target.device == "cuda" or config.triton_interpret()

    def auto_available(self, target: Target) -> bool:
        """`auto` picks Triton only on a CUDA GPU: the interpreter is for tests, far slower than ONNX Runtime."""
        return target.device == "cuda" and self.available(target)

    def unavailable_reason(self, target: Target) -> str:
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        return ("the triton backend generates GPU kernels and this machine has no CUDA GPU; use "
                "backend='onnxruntime' on a CPU (TRITON_INTERPRET=1 runs the kernels in Triton's slow interpreter, "
                "for tests)")

    def supports(self, node: Node) -> bool:
        return True

    def compile(self, graph: Graph, target: Target, example_inputs=None):
        if not self.available(target):
            raise BackendError(self.unavailable_reason(target))
        from blade.backends.triton.program import TritonProgram

        return TritonProgram(graph, interpret=config.triton_interpret())

    def load(self, directory: str, graph: Graph, target: Target):
        """Regenerates the kernels from the IR: the saved sources are for reading, never executed."""
        if not self.available(target):
            raise BackendError(self.unavailable_reason(target))
        from blade.backends.triton.program import TritonProgram

        return TritonProgram(graph, interpret=config.triton_interpret())
