"""Triton source for fused regions: loop (elementwise over broadcast operands), row reduction, matmul + epilogue."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from blade.ir.fused import FusedRegion
from blade.ir.graph import Node, TensorMeta

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
        name = str(node.target)
        a = [self.value(x) if isinstance(x, (Node, int, float, bool)) else x for x in node.args]
        kw = node.kwargs
        if self.stats is not None and reduction_kind(node):
            return self.emit(node, self._from_stats(node, a))
        binary = {"aten.add": "+", "aten.sub": "-", "aten.mul": "*", "aten.div": "/"}
        base = name.rsplit(".", 1)[0]
        if base in binary:
            if kw.get("rounding_mode") is not None:
                raise Unsupported(f"{name} with rounding_mode")
            alpha = kw.get("alpha", node.args[2] if len(node.args) > 2 and base in ("aten.add", "aten.sub") else 1)
            other = a[1] if alpha == 1 else f"({_literal(alpha)} * {a[1]})"
            return self.emit(node, f"({a[0]} {binary[base]} {other})")
        if base == "aten.rsub":
            alpha = node.args[2] if len(node.args) > 2 else kw.get("alpha", 1)
            return self.emit(node, f"({a[1]} - {_literal(alpha)} * {a[0]})" if alpha != 1 else f"({a[1]} - {a[0]})")
        unary = {"aten.neg": "(-{0})", "aten.exp": "tl.exp({0})", "aten.log": "tl.log({0})",
                 "aten.sqrt": "tl.sqrt({0})", "aten.rsqrt": "tl.rsqrt({0})", "aten.abs": "tl.abs({0})",
                 "aten.sin": "tl.sin({0})", "aten.cos": "tl.cos({0})", "aten.erf": "tl.erf({0})",
                 "aten.sigmoid": "tl.sigmoid({0})", "aten.relu": "tl.maximum({0}, 0.0)",
                 "aten.silu": "({0} * tl.sigmoid({0}))", "aten.alias": "{0}", "aten.clone": "{0}",
                 "aten.reciprocal": "(1.0 / {0})"}
        if base in unary:
            return self.emit(node, unary[base].format(a[0]))
        if base == "aten.tanh":
            return self.emit(node, _tanh(a[0]))
        if base == "aten.gelu":
            x = a[0]
            if kw.get("approximate", "none") == "tanh":
                inner = f"(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x}))"
                return self.emit(node, f"(0.5 * {x} * (1.0 + {_tanh(inner)}))")
            return self.emit(node, f"(0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476)))")
        if base == "aten.pow" and name.endswith("Tensor_Scalar"):
            exponent = node.args[1]
            forms = {2: "({0} * {0})", 3: "({0} * {0} * {0})", 1: "{0}", 0.5: "tl.sqrt({0})", -0.5: "tl.rsqrt({0})",
                     -1: "(1.0 / {0})"}
            if exponent not in forms:
                raise Unsupported(f"{name} with exponent {exponent}")
            return self.emit(node, forms[exponent].format(a[0]))
        compare = {"aten.eq": "==", "aten.ne": "!=", "aten.lt": "<", "aten.le": "<=", "aten.gt": ">", "aten.ge": ">="}
        if base in compare:
            return self.emit(node, f"({a[0]} {compare[base]} {a[1]})")
        logical = {"aten.logical_not": "({0} == 0)", "aten.logical_and": "(({0} != 0) & ({1} != 0))",
                   "aten.logical_or": "(({0} != 0) | ({1} != 0))", "aten.bitwise_and": "({0} & {1})"}
        if base in logical:
            return self.emit(node, logical[base].format(*a[:2]) if len(a) > 1 else logical[base].format(a[0]))
        if base == "aten.masked_fill":
            return self.emit(node, f"tl.where({a[1]} != 0, {a[2]}, {a[0]})")
        if base == "aten.hardtanh":
            low, high = (list(node.args[1:]) + [-1.0, 1.0])[:2]
            return self.emit(node, f"tl.minimum(tl.maximum({a[0]}, {_literal(low)}), {_literal(high)})")
        if base == "aten.leaky_relu":
            slope = node.args[1] if len(node.args) > 1 else 0.01
            return self.emit(node, f"tl.where({a[0]} > 0, {a[0]}, {a[0]} * {_literal(slope)})")
        if base in ("aten.maximum", "aten.minimum"):
            return self.emit(node, f"tl.{base[5:]}({a[0]}, {a[1]})")
        if base == "aten.where":
            return self.emit(node, f"tl.where({a[0]} != 0, {a[1]}, {a[2]})")
        if base == "aten.clamp":
            low, high = (list(node.args[1:]) + [None, None])[:2]
            low, high = kw.get("min", low), kw.get("max", high)
            expr = a[0]
            if low is not None:
                expr = f"tl.maximum({expr}, {_literal(low)})"
            if high is not None:
                expr = f"tl.minimum({expr}, {_literal(high)})"
            return self.emit(node, expr)
        if base in ("aten.to", "aten._to_copy"):
            dtype = kw.get("dtype", node.args[1] if len(node.args) > 1 else None)
            if not isinstance(dtype, torch.dtype) or dtype not in _TL_DTYPES:
                raise Unsupported(f"{name} to {dtype}")
            return self.emit(node, f"_to_dtype({a[0]}, {_TL_DTYPES[dtype]})")
        if name in ("aten.sum.dim_IntList", "aten.mean.dim"):
            self.last_axis(node, node.args[1])
            total = self.reduce(a[0], "sum")
            return self.emit(node, total if base == "aten.sum" else f"({total} / N)")
        if base == "aten.amax":
            self.last_axis(node, node.args[1])
            return self.emit(node, self.reduce(a[0], "max"))
        if base == "aten.var" and name.endswith("correction"):
            self.last_axis(node, node.args[1])
            correction = kw.get("correction", 1)
            mean = self.reduce(a[0], "sum") + " / N"
            self.lines.append(f"m{self.count} = {mean}")
            centered = f"({a[0]} - m{self.count})"
            return self.emit(node, f"({self.reduce(f'{centered} * {centered}', 'sum')} / (N - {_literal(correction)}))")
        if base == "aten.layer_norm":
            x, shape = a[0], node.args[1]
            if len(shape) != 1:
                raise Unsupported("layer_norm over more than the last dim")
            eps = _norm_args(node)[2]
            k = self.count
            self.lines.append(f"m{k} = {self.reduce(x, 'sum')} / N")
            self.lines.append(f"d{k} = tl.where(mask, {x} - m{k}, 0.0)")
            self.lines.append(f"r{k} = tl.rsqrt(tl.sum(d{k} * d{k}, axis=0) / N + {_literal(eps)})")
            return self.emit(node, self._affine(f"(d{k} * r{k})", node))
        if base in ("aten._softmax", "aten.softmax"):
            self.last_axis(node, node.args[1])
            k = self.count
            self.lines.append(f"e{k} = tl.exp({a[0]} - {self.reduce(a[0], 'max')})")
            return self.emit(node, f"(e{k} / {self.reduce(f'e{k}', 'sum')})")
        raise Unsupported(f"no Triton translation for {name}")

    def _affine(self, normalized: str, node: Node) -> str:
        """layer_norm's weight and bias applied to the normalized row."""
        weight, bias, _ = _norm_args(node)
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


def reduction_kind(node: Node) -> str | None:
    """sum, mean, amax, var, layer_norm or softmax for the row reductions the writer knows; else None."""
    name = str(node.target)
    base = name.rsplit(".", 1)[0]
    if name in ("aten.sum.dim_IntList", "aten.mean.dim"):
        return base[5:]
    if base == "aten.amax":
        return "amax"
    if base == "aten.var" and name.endswith("correction"):
        return "var"
    if base == "aten.layer_norm":
        return "layer_norm"
    if base in ("aten._softmax", "aten.softmax"):
        return "softmax"
    return None


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
            if kind == "layer_norm" and len(node.args[1]) != 1:
                raise Unsupported("layer_norm over more than the last dim")
            if isinstance(meta, TensorMeta) and meta.rank < operand.rank:
                if id(node) in read:
                    raise Unsupported(f"{node.name} drops the reduced dim and is read again inside the region")
                continue
        if isinstance(meta, TensorMeta) and meta.rank and meta.shape[-1] not in (1, last):
            raise Unsupported(f"{node.name} changes the row length")


def _norm_args(node: Node) -> tuple:
    """layer_norm's weight, bias and eps, given by position or by name."""
    weight, bias, eps = (list(node.args[2:5]) + [None, None, 1e-5])[:3]
    return (node.kwargs.get("weight", weight), node.kwargs.get("bias", bias), node.kwargs.get("eps", eps))


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
        _Writer(row_mode=True).last_axis(node, -1 if kind == "layer_norm" else node.args[1])
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
                correction = node.kwargs.get("correction", 1)
                stats[id(node)] = {"value": f"({deviations} / (N - {_literal(correction)}))"}
            else:
                eps = _norm_args(node)[2]
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
    if str(matmul.target) != "aten.linear.default":
        raise Unsupported(f"matmul {matmul.target}")
    x, weight = matmul.args[0], matmul.args[1]
    bias = matmul.args[2] if len(matmul.args) > 2 else None
    inputs = list(region.body.inputs)
    if not (isinstance(weight, Node) and weight in inputs and x in inputs and (bias is None or bias in inputs)):
        raise Unsupported("matmul operands computed inside the region")
    out_meta = outputs[0].val
    rank = out_meta.rank
    if rank < 2 or any(str(n.target).split(".")[-2:-1] in (["view"], ["reshape"], ["_unsafe_view"]) for n in calls[1:]):
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
    try:
        return GENERATORS[region.kind](region, name)
    except (KeyError, IndexError, AttributeError, TypeError) as exc:  # a body shape the templates do not cover
        raise Unsupported(f"{type(exc).__name__} while writing the kernel: {exc}") from None
