"""Triton source for fused regions: loop (elementwise over broadcast operands), row reduction, matmul + epilogue."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from blade.ir.fused import FusedRegion
from blade.ir.graph import Node, TensorMeta
from blade.ops.info import RESHAPES, WHERES, arg

aten = torch.ops.aten
MAX_ROW = 16384  # longest row a persistent row kernel holds in one block; longer rows are walked in blocks
LOOP_BLOCK_N = 4096  # the block a looped row kernel walks a long row in


class Unsupported(Exception):
    """The generator cannot write this region; it runs as PyTorch ops inside the same program."""


@dataclass
class KernelSource:
    """One generated kernel: its Triton source and how to launch it."""

    name: str
    kind: str  # loop | reduction | matmul_epilogue
    source: str
    rank: int  # rank of the iteration space (the first output's shape)
    n_inputs: int
    n_outputs: int
    out_vector: list[bool] = field(default_factory=list)  # reduction: output is [.., N] (else one value per row)
    matmul: dict = field(default_factory=dict)  # matmul_epilogue: roles of the A/B/bias operands
    looped: bool = False  # reduction: the row is walked in BLOCK_N pieces (too long for one block)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]


_TL_DTYPES = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
              torch.float64: "tl.float64", torch.int64: "tl.int64", torch.int32: "tl.int32", torch.int8: "tl.int8",
              torch.uint8: "tl.uint8", torch.bool: "tl.int1"}


def _tanh(x: str) -> str:
    return f"(1.0 - 2.0 / (tl.exp(2.0 * {x}) + 1.0))"


def _literal(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            return {True: "float('inf')", False: "float('-inf')"}[value > 0] if value == value else "float('nan')"
        return repr(float(value)) if isinstance(value, float) else repr(value)
    raise Unsupported(f"argument {value!r} is not a number")


class _Writer:
    """Translates a region body, op by op, into Triton statements over named values."""

    def __init__(self, row_mode: bool, prefix: str = "", stats: dict | None = None):
        self.lines: list[str] = []
        self.names: dict[int, str] = {}
        self.row_mode = row_mode  # values are rows [BLOCK_N] (or one value per row) and reductions are legal
        self.count = 0
        self.prefix = prefix  # distinct names per pass of a looped row kernel
        self.stats = stats  # looped row kernels: each reduction's per-row statistics, computed by earlier passes

    def value(self, arg) -> str:
        if isinstance(arg, Node):
            return self.names[id(arg)]
        return _literal(arg)

    def emit(self, node: Node, expr: str) -> None:
        name = f"{self.prefix}v{self.count}"
        self.count += 1
        self.lines.append(f"{name} = {expr}")
        self.names[id(node)] = name

    def reduce(self, x: str, how: str) -> str:
        if not self.row_mode:
            raise Unsupported("a reduction outside a row kernel")
        if how == "max":
            return f"tl.max(tl.where(mask, {x}, float('-inf')), axis=0)"
        return f"tl.sum(tl.where(mask, {x}, 0.0), axis=0)"

    def last_axis(self, node: Node, dims) -> None:
        rank = node.args[0].val.rank
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if [d % rank for d in dims] != [rank - 1]:
            raise Unsupported(f"{node.name} reduces over dims {dims}, not the last one")

    def op(self, node: Node) -> None:
        """The statement for one body node, written by the node's op's emitter; Unsupported for an op with none."""
        operands = [self.value(x) if isinstance(x, (Node, int, float, bool)) else x for x in node.args]
        if self.stats is not None and reduction_kind(node):
            return self.emit(node, self._from_stats(node, operands))
        emitter = EMITTERS.get(node.target)
        if emitter is None:
            raise Unsupported(f"no Triton translation for {node.target}")
        self.emit(node, emitter(self, node, operands))

    def _affine(self, normalized: str, node: Node) -> str:
        """layer_norm's weight and bias applied to the normalized row."""
        weight, bias = arg(node, "weight"), arg(node, "bias")
        expr = f"({normalized} * {self.value(weight)})" if weight is not None else normalized
        return f"({expr} + {self.value(bias)})" if bias is not None else expr

    def _from_stats(self, node: Node, a: list) -> str:
        """A reduction's value in a looped kernel, from the statistics earlier passes computed."""
        stats = self.stats[id(node)]
        kind = reduction_kind(node)
        if kind == "layer_norm":
            return self._affine(f"(({a[0]} - {stats['mean']}) * {stats['rstd']})", node)
        if kind == "softmax":
            return f"(tl.exp({a[0]} - {stats['max']}) / {stats['sum']})"
        return stats["value"]


# Emitters: (writer, node, operands as Triton expressions or literals) -> the node's value as a Triton expression.
# An emitter may write statements first (writer.lines) and raises Unsupported for a form it does not cover.
Emitter = Callable[[_Writer, Node, list], str]


def _formatted(template: str) -> Emitter:
    """An op written as one expression of its positional operands ({0}, {1}, …)."""
    return lambda writer, node, a: template.format(*a)


def _binary(symbol: str, alpha: bool = False) -> Emitter:
    """a <symbol> b, with add's and sub's `alpha` scaling b."""
    def emit(writer: _Writer, node: Node, a: list) -> str:
        scale = arg(node, "alpha") if alpha else 1
        other = a[1] if scale == 1 else f"({_literal(scale)} * {a[1]})"
        return f"({a[0]} {symbol} {other})"
    return emit


def _divide_with_mode(writer: _Writer, node: Node, a: list) -> str:
    if arg(node, "rounding_mode") is not None:
        raise Unsupported(f"{node.target} with rounding_mode")
    return _binary("/")(writer, node, a)


def _reverse_subtract(writer: _Writer, node: Node, a: list) -> str:
    alpha = arg(node, "alpha")
    return f"({a[1]} - {_literal(alpha)} * {a[0]})" if alpha != 1 else f"({a[1]} - {a[0]})"


def _gelu(writer: _Writer, node: Node, a: list) -> str:
    x = a[0]
    if arg(node, "approximate") == "tanh":
        inner = f"(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x}))"
        return f"(0.5 * {x} * (1.0 + {_tanh(inner)}))"
    return f"(0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476)))"


_POWERS = {2: "({0} * {0})", 3: "({0} * {0} * {0})", 1: "{0}", 0.5: "tl.sqrt({0})", -0.5: "tl.rsqrt({0})",
           -1: "(1.0 / {0})"}


def _power(writer: _Writer, node: Node, a: list) -> str:
    exponent = arg(node, "exponent")
    if exponent not in _POWERS:
        raise Unsupported(f"{node.target} with exponent {exponent}")
    return _POWERS[exponent].format(a[0])


def _hardtanh(writer: _Writer, node: Node, a: list) -> str:
    low, high = arg(node, "min_val", -1.0), arg(node, "max_val", 1.0)
    return f"tl.minimum(tl.maximum({a[0]}, {_literal(low)}), {_literal(high)})"


def _leaky_relu(writer: _Writer, node: Node, a: list) -> str:
    return f"tl.where({a[0]} > 0, {a[0]}, {a[0]} * {_literal(arg(node, 'negative_slope', 0.01))})"


def _clamp(writer: _Writer, node: Node, a: list) -> str:
    low, high, expr = arg(node, "min"), arg(node, "max"), a[0]
    if low is not None:
        expr = f"tl.maximum({expr}, {_literal(low)})"
    if high is not None:
        expr = f"tl.minimum({expr}, {_literal(high)})"
    return expr


def _cast(writer: _Writer, node: Node, a: list) -> str:
    dtype = arg(node, "dtype")
    if not isinstance(dtype, torch.dtype) or dtype not in _TL_DTYPES:
        raise Unsupported(f"{node.target} to {dtype}")
    return f"_to_dtype({a[0]}, {_TL_DTYPES[dtype]})"


def _sum_or_mean(writer: _Writer, node: Node, a: list) -> str:
    writer.last_axis(node, arg(node, "dim"))
    total = writer.reduce(a[0], "sum")
    return total if node.target == aten.sum.dim_IntList else f"({total} / N)"


def _amax(writer: _Writer, node: Node, a: list) -> str:
    writer.last_axis(node, arg(node, "dim"))
    return writer.reduce(a[0], "max")


def _var(writer: _Writer, node: Node, a: list) -> str:
    writer.last_axis(node, arg(node, "dim"))
    correction = arg(node, "correction", 1)
    writer.lines.append(f"m{writer.count} = {writer.reduce(a[0], 'sum')} / N")
    centered = f"({a[0]} - m{writer.count})"
    return f"({writer.reduce(f'{centered} * {centered}', 'sum')} / (N - {_literal(correction)}))"


def _layer_norm(writer: _Writer, node: Node, a: list) -> str:
    x = a[0]
    if len(arg(node, "normalized_shape")) != 1:
        raise Unsupported("layer_norm over more than the last dim")
    k = writer.count
    writer.lines.append(f"m{k} = {writer.reduce(x, 'sum')} / N")
    writer.lines.append(f"d{k} = tl.where(mask, {x} - m{k}, 0.0)")
    writer.lines.append(f"r{k} = tl.rsqrt(tl.sum(d{k} * d{k}, axis=0) / N + {_literal(arg(node, 'eps'))})")
    return writer._affine(f"(d{k} * r{k})", node)


def _softmax(writer: _Writer, node: Node, a: list) -> str:
    writer.last_axis(node, arg(node, "dim"))
    k = writer.count
    writer.lines.append(f"e{k} = tl.exp({a[0]} - {writer.reduce(a[0], 'max')})")
    return f"(e{k} / {writer.reduce(f'e{k}', 'sum')})"


_UNARY = {
    aten.neg.default: "(-{0})", aten.exp.default: "tl.exp({0})", aten.log.default: "tl.log({0})",
    aten.sqrt.default: "tl.sqrt({0})", aten.rsqrt.default: "tl.rsqrt({0})", aten.abs.default: "tl.abs({0})",
    aten.sin.default: "tl.sin({0})", aten.cos.default: "tl.cos({0})", aten.erf.default: "tl.erf({0})",
    aten.sigmoid.default: "tl.sigmoid({0})", aten.relu.default: "tl.maximum({0}, 0.0)",
    aten.silu.default: "({0} * tl.sigmoid({0}))", aten.alias.default: "{0}", aten.clone.default: "{0}",
    aten.reciprocal.default: "(1.0 / {0})", aten.logical_not.default: "({0} == 0)",
}
_COMPARISONS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_TWO_OPERANDS = {
    aten.logical_and.default: "(({0} != 0) & ({1} != 0))", aten.logical_or.default: "(({0} != 0) | ({1} != 0))",
    aten.bitwise_and.Tensor: "({0} & {1})", aten.bitwise_and.Scalar: "({0} & {1})",
    aten.maximum.default: "tl.maximum({0}, {1})", aten.minimum.default: "tl.minimum({0}, {1})",
    aten.masked_fill.Scalar: "tl.where({1} != 0, {2}, {0})", aten.masked_fill.Tensor: "tl.where({1} != 0, {2}, {0})",
    **{op: "tl.where({0} != 0, {1}, {2})" for op in WHERES},
    **{getattr(getattr(aten, name), kind): f"({{0}} {symbol} {{1}})"
       for name, symbol in _COMPARISONS.items() for kind in ("Tensor", "Scalar")},
}

# The one table of what the generator writes: op overload -> emitter. An op not here runs as PyTorch.
EMITTERS: dict = {
    **{op: _formatted(template) for op, template in (_UNARY | _TWO_OPERANDS).items()},
    aten.add.Tensor: _binary("+", alpha=True), aten.add.Scalar: _binary("+", alpha=True),
    aten.sub.Tensor: _binary("-", alpha=True), aten.sub.Scalar: _binary("-", alpha=True),
    aten.mul.Tensor: _binary("*"), aten.mul.Scalar: _binary("*"),
    aten.div.Tensor: _binary("/"), aten.div.Scalar: _binary("/"),
    aten.div.Tensor_mode: _divide_with_mode, aten.div.Scalar_mode: _divide_with_mode,
    aten.rsub.Tensor: _reverse_subtract, aten.rsub.Scalar: _reverse_subtract,
    aten.tanh.default: lambda writer, node, a: _tanh(a[0]),
    aten.gelu.default: _gelu,
    aten.pow.Tensor_Scalar: _power,
    aten.hardtanh.default: _hardtanh,
    aten.leaky_relu.default: _leaky_relu,
    aten.clamp.default: _clamp,
    aten._to_copy.default: _cast, aten.to.dtype: _cast, aten.to.dtype_layout: _cast,
    aten.sum.dim_IntList: _sum_or_mean, aten.mean.dim: _sum_or_mean,
    aten.amax.default: _amax,
    aten.var.correction: _var,
    aten.layer_norm.default: _layer_norm,
    aten.softmax.int: _softmax, aten._softmax.default: _softmax,
}

# The row reductions the writer knows, by kind (a looped row kernel computes each kind's statistics).
REDUCTION_KINDS = {aten.sum.dim_IntList: "sum", aten.mean.dim: "mean", aten.amax.default: "amax",
                   aten.var.correction: "var", aten.layer_norm.default: "layer_norm", aten.softmax.int: "softmax",
                   aten._softmax.default: "softmax"}


def reduction_kind(node: Node) -> str | None:
    """sum, mean, amax, var, layer_norm or softmax for the row reductions the writer knows; else None."""
    return REDUCTION_KINDS.get(node.target)


def _operand_lines(index: int, rank: int, lead_only: bool, idx_prefix: str = "i") -> str:
    dims = range(rank - 1) if lead_only else range(rank)
    return " + ".join([f"{idx_prefix}{d} * s{index}_{d}" for d in dims] or ["0"])


def _unravel(rank: int, var: str, lead_only: bool, prefix: str = "i", indent: str = "    ") -> list[str]:
    """Index of each dim from a flat index over the (leading) dims, last dim fastest."""
    dims = list(range(rank - 1 if lead_only else rank))
    if not dims:
        return []
    lines = [f"{indent}rem = {var}"]
    for d in reversed(dims[1:]):
        lines += [f"{indent}{prefix}{d} = rem % size_{d}", f"{indent}rem = rem // size_{d}"]
    lines.append(f"{indent}{prefix}{dims[0]} = rem")
    return lines


def _params(n_in: int, n_out: int, rank: int) -> list[str]:
    params = [f"in{i}" for i in range(n_in)] + [f"out{j}" for j in range(n_out)]
    params += [f"size_{d}" for d in range(rank)]
    params += [f"s{i}_{d}" for i in range(n_in) for d in range(rank)]
    return params


def _header(name: str, params: list[str], constexprs: list[str]) -> list[str]:
    return ["@triton.jit", f"def {name}({', '.join(params + [f'{c}: tl.constexpr' for c in constexprs])}):"]


def _load(i: int, offset: str, mask: str, compute_float: bool) -> str:
    load = f"tl.load(in{i} + {offset}, mask={mask}, other=0)"
    return f"{load}.to(tl.float32)" if compute_float else load


def _is_float(meta) -> bool:
    return isinstance(meta, TensorMeta) and meta.dtype.is_floating_point


def _outputs(region: FusedRegion) -> list[Node]:
    outputs = list(region.body.outputs)
    if not all(isinstance(o, Node) and isinstance(o.val, TensorMeta) for o in outputs):
        raise Unsupported("an output that is not a tensor")
    return outputs


def loop_kernel(region: FusedRegion, name: str) -> KernelSource:
    """One program per BLOCK of output elements; each operand read through its broadcast strides."""
    outputs = _outputs(region)
    shape = outputs[0].val.shape
    if any(o.val.shape != shape for o in outputs):
        raise Unsupported("outputs of different shapes")
    rank, inputs = len(shape), region.body.inputs
    writer = _Writer(row_mode=False)
    lines = _header(name, _params(len(inputs), len(outputs), rank) + ["numel"], ["BLOCK"])
    lines += ["    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)", "    mask = offs < numel"]
    lines += _unravel(rank, "offs", lead_only=False)
    for i, node in enumerate(inputs):
        writer.names[id(node)] = f"x{i}"
        lines.append(f"    x{i} = {_load(i, _operand_lines(i, rank, False), 'mask', _is_float(node.val))}")
    for node in region.body.call_nodes:
        writer.op(node)
    lines += [f"    {line}" for line in writer.lines]
    for j, out in enumerate(outputs):
        lines.append(f"    tl.store(out{j} + offs, _to_dtype({writer.value(out)}, out{j}.dtype.element_ty), mask=mask)")
    return KernelSource(name, "loop", _module(lines), rank, len(inputs), len(outputs))


def row_kernel(region: FusedRegion, name: str) -> KernelSource:
    """One program per row of the last dim (held whole: a persistent row); reductions over that dim.

    The iteration space is the inputs' broadcast shape (what the launcher computes); outputs are whole
    rows, or one value per row ([.., 1] or [..])."""
    outputs, inputs, rank, last = _row_space(region)
    if last > MAX_ROW:
        return looped_row_kernel(region, name)
    writer = _Writer(row_mode=True)
    lines = _header(name, _params(len(inputs), len(outputs), rank), ["N", "BLOCK_N"])
    lines += ["    row = tl.program_id(0).to(tl.int64)", "    cols = tl.arange(0, BLOCK_N)", "    mask = cols < N"]
    lines += _unravel(rank, "row", lead_only=True)
    for i, node in enumerate(inputs):
        lead = " + ".join([f"i{d} * s{i}_{d}" for d in range(rank - 1)] or ["0"])
        offset = f"{lead} + cols * s{i}_{rank - 1}"
        writer.names[id(node)] = f"x{i}"
        lines.append(f"    x{i} = {_load(i, offset, 'mask', _is_float(node.val))}")
    for node in region.body.call_nodes:
        writer.op(node)
    lines += [f"    {line}" for line in writer.lines]
    stores, vector = _row_stores(outputs, writer, rank, last, "    ")
    return KernelSource(name, "reduction", _module(lines + stores), rank, len(inputs), len(outputs), out_vector=vector)


def _row_stores(outputs: list[Node], writer: _Writer, rank: int, last: int, indent: str) -> tuple[list[str], list]:
    """Stores of a row kernel's outputs: whole rows under the column mask, or one value per row from lane 0
    (of the first block, in a looped kernel) — a reduction's scalar or a row of equal lanes alike."""
    lines, vector = [], []
    for j, out in enumerate(outputs):
        is_vector = out.val.rank == rank and out.val.shape[-1] == last
        if not is_vector and out.val.rank not in (rank - 1, rank):
            raise Unsupported(f"output {j} has rank {out.val.rank} in a rank-{rank} row kernel")
        vector.append(is_vector)
        value, dtype = writer.value(out), f"out{j}.dtype.element_ty"
        if is_vector:
            lines.append(f"{indent}tl.store(out{j} + row * N + cols, _to_dtype({value}, {dtype}), mask=mask)")
        else:
            lines.append(f"{indent}tl.store(out{j} + row + cols * 0, _to_dtype({value} + tl.zeros((BLOCK_N,), "
                         f"tl.float32), {dtype}), mask=cols == 0)")
    return lines, vector


def _row_space(region: FusedRegion) -> tuple[list[Node], list[Node], int, int]:
    """(outputs, inputs, rank, row length) of a row kernel: the inputs' broadcast shape, checked."""
    outputs = _outputs(region)
    inputs = region.body.inputs
    rank = max(n.val.rank for n in inputs)
    lasts = [n.val.shape[-1] for n in inputs if n.val.rank]
    if not lasts or not all(isinstance(d, int) for d in lasts):
        raise Unsupported("the row length is dynamic")
    last = max(lasts)
    _check_rows(region, rank, last)
    return outputs, inputs, rank, last


def _check_rows(region: FusedRegion, rank: int, last: int) -> None:
    """Every value is a row of `last` or one value per row, and every reduction reduces a whole float row.

    A reduction without keepdim ([..]) may only be an output: read inside the body, torch would broadcast it
    along the last axis, not per row."""
    calls = list(region.body.call_nodes)
    read = {id(ref) for node in calls for ref in node.refs()}
    outputs = [o for o in region.body.outputs if isinstance(o, Node)]
    for node in calls + outputs:
        meta = node.val
        kind = reduction_kind(node)
        if kind:
            operand = node.args[0].val
            if not operand.dtype.is_floating_point:
                raise Unsupported(f"{node.name} reduces {operand.dtype} values (the kernels accumulate in float32)")
            if operand.shape[-1] != last:
                raise Unsupported(f"{node.name} reduces a dim of {operand.shape[-1]}, not the row of {last}")
            if kind == "layer_norm" and len(arg(node, "normalized_shape")) != 1:
                raise Unsupported("layer_norm over more than the last dim")
            if isinstance(meta, TensorMeta) and meta.rank < operand.rank:
                if id(node) in read:
                    raise Unsupported(f"{node.name} drops the reduced dim and is read again inside the region")
                continue
        if isinstance(meta, TensorMeta) and meta.rank and meta.shape[-1] not in (1, last):
            raise Unsupported(f"{node.name} changes the row length")


def _ancestors(node: Node, calls: list[Node]) -> list[Node]:
    """The call nodes `node` depends on (itself included), in the body's order."""
    wanted, stack = set(), [node]
    while stack:
        current = stack.pop()
        if id(current) in wanted:
            continue
        wanted.add(id(current))
        stack += current.refs()
    return [n for n in calls if id(n) in wanted]


def looped_row_kernel(region: FusedRegion, name: str) -> KernelSource:
    """Rows too long for one block: each reduction takes passes over the row in BLOCK_N pieces (the values it
    needs recomputed in each), keeping its per-row statistics; a last pass writes the outputs."""
    outputs, inputs, rank, last = _row_space(region)
    calls = list(region.body.call_nodes)
    lines = _header(name, _params(len(inputs), len(outputs), rank), ["N", "BLOCK_N"])
    lines += ["    row = tl.program_id(0).to(tl.int64)"]
    lines += _unravel(rank, "row", lead_only=True)
    for i in range(len(inputs)):
        lead = " + ".join([f"i{d} * s{i}_{d}" for d in range(rank - 1)] or ["0"])
        lines.append(f"    base{i} = {lead}")
    stats: dict[int, dict] = {}

    def block(prefix: str, nodes: list[Node]) -> tuple[_Writer, list[str]]:
        writer = _Writer(row_mode=True, prefix=prefix, stats=stats)
        body = ["        cols = c0 + tl.arange(0, BLOCK_N)", "        mask = cols < N"]
        for i, node in enumerate(inputs):
            writer.names[id(node)] = f"{prefix}x{i}"
            body.append(f"        {prefix}x{i} = {_load(i, f'base{i} + cols * s{i}_{rank - 1}', 'mask', _is_float(node.val))}")
        for node in nodes:
            writer.op(node)
        return writer, body + [f"        {line}" for line in writer.lines]

    def accumulate(key: str, nodes: list[Node], operand: Node, update: str, start: str) -> str:
        writer, body = block(f"p{key}_", nodes)
        x = writer.value(operand)
        lines.append(f"    acc{key} = tl.full([1], {start}, tl.float32)")
        lines.append("    for c0 in range(0, N, BLOCK_N):")
        lines.extend(body)
        lines.append(f"        acc{key} = {update.format(x=x, acc=f'acc{key}')}")
        lines.append(f"    t{key} = tl.{'max' if 'maximum' in update else 'sum'}(acc{key}, axis=0)")
        return f"t{key}"

    total = "{acc} + tl.sum(tl.where(mask, {x}, 0.0), axis=0)"
    for k, node in enumerate(calls):
        kind = reduction_kind(node)
        if kind is None:
            continue
        _Writer(row_mode=True).last_axis(node, -1 if kind == "layer_norm" else arg(node, "dim"))
        operand = node.args[0]
        needed = _ancestors(operand, calls) if isinstance(operand, Node) and operand in calls else []
        if kind in ("sum", "mean"):
            value = accumulate(f"{k}", needed, operand, total, "0.0")
            stats[id(node)] = {"value": value if kind == "sum" else f"({value} / N)"}
        elif kind == "amax":
            value = accumulate(f"{k}", needed, operand, "tl.maximum({acc}, tl.max(tl.where(mask, {x}, float('-inf')), "
                               "axis=0))", "float('-inf')")
            stats[id(node)] = {"value": value}
        elif kind == "softmax":
            peak = accumulate(f"{k}m", needed, operand, "tl.maximum({acc}, tl.max(tl.where(mask, {x}, "
                              "float('-inf')), axis=0))", "float('-inf')")
            denominator = accumulate(f"{k}s", needed, operand, "{acc} + tl.sum(tl.where(mask, tl.exp({x} - "
                                     + peak + "), 0.0), axis=0)", "0.0")
            stats[id(node)] = {"max": peak, "sum": denominator}
        else:  # var and layer_norm: the mean, then the squared deviations from it
            mean = f"({accumulate(f'{k}m', needed, operand, total, '0.0')} / N)"
            deviations = accumulate(f"{k}v", needed, operand, "{acc} + tl.sum(tl.where(mask, ({x} - " + mean +
                                    ") * ({x} - " + mean + "), 0.0), axis=0)", "0.0")
            if kind == "var":
                correction = arg(node, "correction", 1)
                stats[id(node)] = {"value": f"({deviations} / (N - {_literal(correction)}))"}
            else:
                eps = arg(node, "eps")
                stats[id(node)] = {"mean": mean, "rstd": f"tl.rsqrt({deviations} / N + {_literal(eps)})"}
    writer, body = block("o_", calls)
    lines.append("    for c0 in range(0, N, BLOCK_N):")
    lines.extend(body)
    stores, vector = _row_stores(outputs, writer, rank, last, "        ")
    return KernelSource(name, "reduction", _module(lines + stores), rank, len(inputs), len(outputs), out_vector=vector,
                        looped=True)


def matmul_kernel(region: FusedRegion, name: str) -> KernelSource:
    """C = A @ B (+ bias) over tiles, then the region's epilogue on the tile, one store."""
    outputs = _outputs(region)
    if len(outputs) != 1:
        raise Unsupported("a matmul epilogue with several outputs")
    calls = region.body.call_nodes
    matmul = calls[0]
    if matmul.target != aten.linear.default:
        raise Unsupported(f"matmul {matmul.target}")
    x, weight = matmul.args[0], matmul.args[1]
    bias = matmul.args[2] if len(matmul.args) > 2 else None
    inputs = list(region.body.inputs)
    if not (isinstance(weight, Node) and weight in inputs and x in inputs and (bias is None or bias in inputs)):
        raise Unsupported("matmul operands computed inside the region")
    out_meta = outputs[0].val
    rank = out_meta.rank
    if rank < 2 or any(n.target in RESHAPES for n in calls[1:]):
        raise Unsupported("a view inside the epilogue")
    roles = {"a": inputs.index(x), "b": inputs.index(weight), "bias": inputs.index(bias) if bias is not None else -1}
    read_later = {id(ref) for node in calls[1:] for ref in node.refs()}
    others = [i for i, node in enumerate(inputs) if i not in roles.values() or id(node) in read_later]
    writer = _Writer(row_mode=False)
    params = ["a", "b", "bias"] + [f"in{i}" for i in others] + ["out0", "M", "N", "K", "s_am", "s_ak", "s_bn", "s_bk",
                                                                 "s_bias"]
    params += [f"size_{d}" for d in range(rank - 1)] + [f"s{i}_{d}" for i in others for d in range(rank)]
    lines = _header(name, params, ["HAS_BIAS", "BLOCK_M", "BLOCK_N", "BLOCK_K", "PRECISION"])
    lines += [
        "    pid_m = tl.program_id(0)",
        "    pid_n = tl.program_id(1)",
        "    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)",
        "    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
        "    rk = tl.arange(0, BLOCK_K)",
        "    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        "    for k0 in range(0, K, BLOCK_K):",
        "        kk = k0 + rk",
        "        a_tile = tl.load(a + rm[:, None] * s_am + kk[None, :] * s_ak, "
        "mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)",
        "        b_tile = tl.load(b + kk[:, None] * s_bk + rn[None, :] * s_bn, "
        "mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)",
        "        acc = tl.dot(a_tile, b_tile, acc, input_precision=PRECISION)",
        "    mask = (rm[:, None] < M) & (rn[None, :] < N)",
        "    if HAS_BIAS:",
        "        acc = acc + tl.load(bias + rn * s_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]",
    ]
    lines += _unravel(rank, "rm", lead_only=True)
    writer.names[id(matmul)] = "acc"
    for i in others:
        lead = " + ".join([f"i{d}[:, None] * s{i}_{d}" for d in range(rank - 1)] or ["0"])
        offset = f"{lead} + rn[None, :] * s{i}_{rank - 1}"
        writer.names[id(inputs[i])] = f"x{i}"
        lines.append(f"    x{i} = {_load(i, offset, 'mask', _is_float(inputs[i].val))}")
    for node in calls[1:]:
        writer.op(node)
    lines += [f"    {line}" for line in writer.lines]
    lines.append(f"    tl.store(out0 + rm[:, None] * N + rn[None, :], _to_dtype({writer.value(outputs[0])}, "
                 "out0.dtype.element_ty), mask=mask)")
    return KernelSource(name, "matmul_epilogue", _module(lines), rank, len(inputs), 1,
                        matmul={**roles, "others": others})


def _module(lines: list[str]) -> str:
    return "import triton\nimport triton.language as tl\n\n\n" + _TO_DTYPE + "\n\n" + "\n".join(lines) + "\n"


GENERATORS = {"loop": loop_kernel, "reduction": row_kernel, "matmul_epilogue": matmul_kernel}


# Every kernel's conversions go through this helper: fp32 -> bf16 is rounded to nearest even by hand
# (Triton's interpreter truncates, which on the CPU tests doubled the error of bf16 models; on a GPU the
# rounding is the same as the hardware's and costs a few integer ops); everything else is a plain cast.
_TO_DTYPE = '''@triton.jit
def _to_dtype(x, dtype: tl.constexpr):
    if dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(dtype)
'''


def generate(region: FusedRegion, name: str) -> KernelSource:
    """The kernel for `region`, or Unsupported with the reason."""
    if any(not isinstance(n.val, TensorMeta) for n in region.body.inputs):
        raise Unsupported("an input that is not a tensor")
    if any(n.val.device != region.body.inputs[0].val.device for n in region.body.inputs):
        raise Unsupported("inputs on several devices")
    metas = [n.val for n in region.body.inputs] + [getattr(o, "val", None) for o in region.body.outputs]
    if any(isinstance(m, TensorMeta) and m.dtype in (torch.float64, torch.complex64, torch.complex128) for m in metas):
        raise Unsupported("float64 or complex tensors (the kernels compute in float32)")
    generator = GENERATORS.get(region.kind)
    if generator is None:
        raise Unsupported(f"no kernel template for {region.kind} regions")
    return generator(region, name)  # an error other than Unsupported is a bug in the generator: it propagates
