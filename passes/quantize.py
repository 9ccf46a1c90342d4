"""Quantization: linear layers → blade::qlinear, embedding tables → blade::qembedding (int8 rows).

Matches: `aten.linear(x, W, b)` with a constant 2-D floating W (and a constant or absent b) on a
floating x; `aten.embedding(W, indices)` and `aten.embedding_bag.padding_idx(W, indices, offsets,
…)` with a constant table and no padding index. Produces, for config.quantize =
- "int8_weight_only" / "int8_dynamic" / "int8_static" / "fp8": `blade::qlinear(x, W_q, scale, b,
  mode)` with W quantized symmetrically per output channel (int8, or float8_e4m3fn for fp8) once, at
  compile time; "int8_static" also records the calibrated activation scale (absmax over the
  calibration inputs of what the layer reads, / 127), measured here by running the graph on them;
- "int4_weight_only": `blade::q4linear(x, packed, scales, b)`, W quantized symmetrically per group of 32
  weights of a row and packed two a byte (4.5 bits a weight); a layer whose input width is not a multiple of 32
  gets int8 weight-only instead (noted);
- every mode: embedding tables as int8 rows with a scale per row, read through
  `blade::qembedding(table_q, row_scale, indices)` (an embedding bag pools the dequantized rows it
  reads, so the fp32 table is never rebuilt). A weight shared by a table and a linear (tied
  embeddings) is quantized once for both when the layer is int8.

A linear named in config.keep_high_precision (the accuracy guard's choice) gets its mode's next rung where it has
one (KEPT_AS: int4_weight_only's kept layers are int8 weight-only, a quarter of fp32's bytes, ~1/18 of int4's
rounding error), and stays as it is otherwise.

Leaves alone: other layers named in config.keep_high_precision, computed
weights, float64 layers, fp16/bf16 embedding tables, embedding bags with a padding index, and (noted
in the report) an int8_static layer whose calibration input was all zeros.
"""
from __future__ import annotations

import math

import torch

from blade.errors import ConfigError
from blade.ir.graph import Graph, Node, TensorMeta
from blade.ops.info import arg, infer_meta
from blade.passes.cleanup import eliminate_dead_code
from blade.passes.manager import PassContext
from blade.ops.quantized import (INT4_GROUP, INT8_MAX, Q4LINEAR, QEMBEDDING, QLINEAR, quantize_int4, quantize_table,
                                 quantize_weight)

aten = torch.ops.aten
QUANTIZE_MODES = ("int8_weight_only", "int8_dynamic", "int8_static", "fp8", "int4_weight_only")
KEPT_AS = {"int4_weight_only": "int8_weight_only"}  # the mode a kept linear gets instead of its own, where not fp32
LOW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
OP_MODE = {"int8_weight_only": "weight_only", "int8_dynamic": "dynamic", "int8_static": "static", "fp8": "fp8",
           "int4_weight_only": "int4"}


def linear_weights(node: Node) -> tuple[Node, Node | None] | None:
    """(W, b) constant nodes of a linear quantization can rewrite, else None."""
    if node.target != aten.linear.default or node.kwargs or not isinstance(node.args[0], Node):
        return None
    weight = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if not (isinstance(weight, Node) and weight.op == "constant") or len(weight.val.shape) != 2:
        return None
    if bias is not None and not (isinstance(bias, Node) and bias.op == "constant"):
        return None
    if not (isinstance(node.val, TensorMeta) and node.val.dtype in LOW_FLOATS and weight.dtype in LOW_FLOATS):
        return None  # float64 layers stay as they are (the op takes fp32/fp16/bf16)
    return weight, bias


def embedding_table(node: Node) -> Node | None:
    """The constant table of an embedding (or padding-free embedding bag) quantization can rewrite."""
    if node.target == aten.embedding.default:
        table = node.args[0]
    elif node.target == aten.embedding_bag.padding_idx:
        table = node.args[0] if arg(node, "padding_idx") in (None, -1) else None
    else:
        return None
    if isinstance(table, Node) and table.op == "constant" and table.dtype == torch.float32 and len(table.val.shape) == 2:
        return table  # fp32 tables only: the op gives fp32 rows
    return None


def quantizable_layers(graph: Graph) -> list[Node]:
    """The nodes the pass would rewrite (linears and embeddings), in order."""
    return [n for n in graph.call_nodes if linear_weights(n) or embedding_table(n)]


class _Weights:
    """Quantized copies of constants, made once per (constant, format) and shared by every reader."""

    def __init__(self, graph: Graph):
        self.graph, self.made = graph, {}

    def get(self, constant: Node, mode: str) -> tuple[Node, Node]:
        kind = mode if mode in ("fp8", "int4") else "int8"
        key = (constant, kind)
        if key not in self.made:
            tensor = self.graph.constants[constant.name]
            if kind == "int4":
                q, scale = quantize_int4(tensor)
            else:
                q, scale = quantize_weight(tensor, mode) if kind == "fp8" else quantize_table(tensor)
            source = constant.target
            self.made[key] = (self.graph.add_constant(f"{constant.name}_{kind}", q.contiguous(), f"{source} ({kind})"),
                              self.graph.add_constant(f"{constant.name}_scale", scale.contiguous(), f"{source} (scale)"))
        return self.made[key]


def run(graph: Graph, ctx: PassContext) -> Graph:
    mode = ctx.config.quantize
    if mode is None:
        return graph
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"quantize={mode!r} is not a mode; choose one of {list(QUANTIZE_MODES)} or None")
    keep = set(ctx.config.keep_high_precision)
    layers = [n for n in quantizable_layers(graph) if n.name not in keep]
    next_rung = [n for n in quantizable_layers(graph) if n.name in keep and mode in KEPT_AS and linear_weights(n)]
    scales = calibrate(graph, [n for n in layers if linear_weights(n)], ctx.config.calibration) \
        if mode == "int8_static" else {}
    if mode == "int8_static":
        bad = [n.name for n in layers if linear_weights(n) and not math.isfinite(scales.get(n.name, 0.0))]
        if bad:
            raise ConfigError(f"calibration_data gives layers {bad} inputs that are not finite (NaN or inf); "
                              "calibrate on inputs the model computes finite values for")
        silent = [n.name for n in layers if linear_weights(n) and scales.get(n.name, 0.0) == 0.0]
        if silent:
            ctx.note(f"not quantized (their calibration inputs were all zeros, no scale to take): {silent}")
            layers = [n for n in layers if n.name not in silent]
    weights = _Weights(graph)
    narrow = []
    for node in layers + next_rung:
        if not ctx.allows(node.name):
            continue
        if linear_weights(node):
            layer_mode = KEPT_AS[mode] if node.name in keep else mode
            if layer_mode == "int4_weight_only" and linear_weights(node)[0].val.shape[1] % INT4_GROUP:
                layer_mode = "int8_weight_only"
                narrow.append(node.name)
            _rewrite_linear(graph, node, layer_mode, weights, scales.get(node.name))
            ctx.count("q4linear" if layer_mode == "int4_weight_only" else f"qlinear_{OP_MODE[layer_mode]}")
        else:
            _rewrite_embedding(graph, node, weights)
            ctx.count("qembedding")
    if narrow:
        ctx.note(f"int8 weight-only, not int4 (input width not a multiple of {INT4_GROUP}): {narrow}")
    if next_rung:
        ctx.note(f"kept at {KEPT_AS[mode]}, not {mode}: {sorted(n.name for n in next_rung)}")
    kept = [n for n in keep if n in {m.name for m in graph.call_nodes}]
    if kept:
        ctx.note(f"kept in high precision: {sorted(kept)}")
    eliminate_dead_code(graph, ctx)
    return graph


run.top_level_only = True  # calibration and the accuracy guard see the whole model; nested graphs stay fp32


def _rewrite_linear(graph: Graph, node: Node, mode: str, weights: _Weights, absmax: float | None) -> None:
    x, (weight, bias) = node.args[0], linear_weights(node)
    op_mode = OP_MODE[mode]
    q, scale = weights.get(weight, op_mode)
    meta = dict(node.meta, quantized=op_mode, layer=node.name)
    if op_mode == "int4":
        new = graph.add_node(Q4LINEAR, (x, q, scale, bias), {}, meta, name=f"q{node.name}")
        graph.replace_all_uses(node, new)
        graph.remove_node(node)
        return
    kwargs = {"mode": op_mode}
    if op_mode == "static":
        kwargs["input_scale"] = absmax / INT8_MAX
    new = graph.add_node(QLINEAR, (x, q, scale, bias), kwargs, meta, name=f"q{node.name}")
    graph.replace_all_uses(node, new)
    graph.remove_node(node)


def _rewrite_embedding(graph: Graph, node: Node, weights: _Weights) -> None:
    table = embedding_table(node)
    q, scale = weights.get(table, "dynamic")
    indices = node.args[1]
    meta = {"val": infer_meta(QEMBEDDING, (q, scale, indices)), "quantized": "int8_rows",
            "layer": node.name, **({"source": node.meta["source"]} if node.meta.get("source") else {})}
    rows = graph.add_node(QEMBEDDING, (q, scale, indices), {}, meta, name=f"q{node.name}_rows")
    if node.target == aten.embedding.default:
        graph.replace_all_uses(node, rows)
    else:  # the bag pools the rows it read, in order: positions 0..L-1 of `rows`
        length = indices.val.shape[0]
        size = graph.add_node(aten.sym_size.int, (indices, 0), {}, {"val": infer_meta(aten.sym_size.int, (indices, 0))},
                              name=f"{node.name}_count")
        # written out, not inferred: an arange that names no device infers as cpu, where these sit with the indices
        positions = graph.add_node(aten.arange.default, (size,), {"dtype": indices.dtype},
                                   {"val": TensorMeta((length,), indices.dtype, indices.val.device)},
                                   name=f"{node.name}_positions")
        bag = graph.add_node(node.target, (rows, positions, *node.args[2:]), dict(node.kwargs), dict(node.meta),
                             name=f"q{node.name}")
        graph.replace_all_uses(node, bag)
    graph.remove_node(node)


def calibrate(graph: Graph, layers: list[Node], samples) -> dict[str, float]:
    """absmax of the input each of `layers` reads, over every calibration sample (flat input lists)."""
    if not samples:
        raise ConfigError("quantize='int8_static' needs calibration_data: an iterable of example inputs "
                          "(each like the model's arguments) that represent what it will see")
    wanted = {n.name for n in layers}
    seen: dict[str, float] = {}

    class Observer(torch.fx.Interpreter):
        def run_node(self, fx_node):
            if fx_node.name in wanted:
                x = self.env[fx_node.args[0]]
                top = float(x.detach().abs().max()) if x.numel() else 0.0
                before = seen.get(fx_node.name, 0.0)
                seen[fx_node.name] = math.nan if math.isnan(top) or math.isnan(before) else max(before, top)
            return super().run_node(fx_node)

    module = graph.to_fx()
    with torch.no_grad():
        for sample in samples:
            Observer(module).run(*sample)
    return seen


