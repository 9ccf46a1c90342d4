"""blade: a graph-level compiler for PyTorch inference.

    cm = blade.compile(model, example_inputs, dynamic_shapes=...)
    cm(*inputs); cm.report; cm.save("model.blade"); blade.load("model.blade")
"""
__version__ = "0.1.0"

from blade import errors  # noqa: E402
from blade.ops import quantized as qops  # noqa: E402,F401 - registers blade::qlinear and blade::qembedding
from blade.api import compile  # noqa: E402
from blade.runtime.artifact import load  # noqa: E402
from blade.runtime.compiled import CompiledModel  # noqa: E402
from blade.config import CompileConfig  # noqa: E402
from blade.ir.graph import Graph  # noqa: E402

__all__ = ["CompileConfig", "CompiledModel", "Graph", "compile", "errors", "load", "__version__"]
