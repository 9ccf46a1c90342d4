"""IR region → ONNX through torch's own exporter (torch.onnx.export, dynamo=True)."""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import onnx
import sympy
import torch
from torch.export import Dim

from blade.backends.onnxruntime.translations import TRANSLATIONS
from blade.ir import Graph, Node

OPSET = 20  # ONNX opset blade emits, recorded with every saved model (20 keeps Gelu one op)


def dynamic_shapes_for(graph: Graph) -> tuple:
    """torch.export dynamic_shapes for the graph's inputs: one Dim per named dim, shared by name."""
    dims: dict[str, Dim] = {}

    def dim(name: str):
        if name not in dims:
            rng = graph.dims.get(name)
            lo = rng.min if rng else 0
            dims[name] = Dim(name, min=lo, max=rng.max) if rng and rng.max is not None else Dim(name, min=lo)
        return dims[name]

    def derived(size):
        """a*d + c of a named dim as torch's derived Dim (keeps the link to d); else Dim.DYNAMIC."""
        if len(size.free_symbols) != 1:
            return Dim.DYNAMIC
        (symbol,) = size.free_symbols
        poly = sympy.Poly(size, symbol) if size.is_polynomial(symbol) else None
        if poly is None or poly.degree() != 1 or not all(c.is_Integer for c in poly.all_coeffs()):
            return Dim.DYNAMIC
        a, c = (int(v) for v in poly.all_coeffs())
        return dim(symbol.name) * a + c if a > 0 else Dim.DYNAMIC

    def axes(node: Node):
        spec = {}
        for axis, size in enumerate(node.val.shape):
            if not isinstance(size, int):
                spec[axis] = dim(size.name) if size.is_Symbol else derived(size)
        return spec or None

    return tuple(axes(n) for n in graph.inputs)


@contextlib.contextmanager
def _quiet():
    """torch.onnx logs every skipped torchvision op and more; blade reports what matters itself."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch._guards",
                                              "torch.fx.experimental.symbolic_shapes")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_region(graph: Graph, example_inputs: list[torch.Tensor]) -> onnx.ModelProto:
    """The graph as an ONNX model whose inputs/outputs are named after the IR nodes."""
    module = graph.to_fx()
    with _quiet():
        program = torch.onnx.export(
            module, tuple(example_inputs), dynamo=True, dynamic_shapes=dynamic_shapes_for(graph),
            opset_version=OPSET, input_names=[n.name for n in graph.inputs],
            output_names=[o.name for o in graph.outputs], custom_translation_table=TRANSLATIONS or None,
            verbose=False)
    return program.model_proto


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` with its weights as external data beside it (no 2 GB protobuf limit)."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)
