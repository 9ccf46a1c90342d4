"""IR region → ONNX through torch's own exporter (torch.onnx.export, dynamo=True)."""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import onnx
import onnxscript.rewriter
import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.optimizer._constant_folding import (DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                                     DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT, FoldConstantsPass)
import sympy
import torch
from torch.export import Dim

from blade.backends.onnxruntime.fused import lower_fused_nodes
from blade.backends.onnxruntime.onnx_rules import SIMPLIFY_RULES
from blade.backends.onnxruntime.translations import TRANSLATIONS
from blade.ir.graph import Graph, Node

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


# Metadata key on every ONNX node: the IR node it came from (torch's own fx_node key names the node
# of torch's re-export, whose names can differ); the profiler joins ONNX Runtime's times by it.
IR_NODE_KEY = "pkg.blade.ir_node"


def export_region(graph: Graph, example_inputs: list[torch.Tensor], device: str = "cpu") -> onnx.ModelProto:
    """The graph as an ONNX model for ONNX Runtime on `device`, inputs/outputs named after the IR nodes."""
    module = graph.to_fx()
    lower_fused_nodes(module, device)
    for node in module.graph.nodes:  # torch.export carries node.meta["custom"] through its retracing
        node.meta["custom"] = {**node.meta.get("custom", {}), IR_NODE_KEY: node.name}
        # A node that carries a stack trace spares fx from capturing a Python traceback for every
        # op its retracing creates (a second of a BERT-base export); this one says where it came from.
        node.meta.setdefault("stack_trace", f"blade IR node {node.name}")
    with _quiet():
        program = torch.onnx.export(
            module, tuple(example_inputs), dynamo=True, dynamic_shapes=dynamic_shapes_for(graph),
            opset_version=OPSET, input_names=[n.name for n in graph.inputs],
            output_names=[o.name for o in graph.outputs], custom_translation_table=TRANSLATIONS or None,
            optimize=False, verbose=False)
    _stamp_ir_nodes(program)
    optimize(program.model)
    return program.model_proto


def optimize(model: ir.Model) -> None:
    """onnxscript's optimizer (what torch.onnx.export(optimize=True) runs) with blade's short rule
    list in place of its default one, whose matching costs seconds on a large model while the
    graph blade hands over needs only these: constant folding, the simplifications in
    SIMPLIFY_RULES, identity and dead-node removal, initializer deduplication, CSE."""
    fold_and_simplify = ir.passes.PassManager(
        [FoldConstantsPass(shape_inference=True, input_size_limit=DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                           output_size_limit=DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
         onnxscript.rewriter.RewritePass(SIMPLIFY_RULES), common.IdentityEliminationPass(),
         common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()],
        steps=2, early_stop=True)
    ir.passes.Sequential(
        common.InlinePass(), fold_and_simplify, common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass())(model)


def _stamp_ir_nodes(program) -> None:
    """Record on each ONNX node the IR node its FX node was traced from."""
    ir_node = {n.name: (n.meta.get("custom") or {}).get(IR_NODE_KEY) for n in program.exported_program.graph.nodes}
    for node in program.model.graph.all_nodes():
        fx_text = node.metadata_props.get("pkg.torch.onnx.fx_node", "")
        name = ir_node.get(fx_text[1:].split(" ", 1)[0]) if fx_text.startswith("%") else None
        if name:
            node.metadata_props[IR_NODE_KEY] = name


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` with its weights as external data beside it (no 2 GB protobuf limit)."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)
