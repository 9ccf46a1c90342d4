"""Cost model: FLOPs and the fewest bytes each node must move, as sympy expressions in the dims.

FLOPs count a multiply-add as 2: exact for linear/addmm/mm/bmm/matmul/convolution and attention
(QKᵀ and PV; causal attention counts the lower triangle it computes); one per output element for
elementwise ops, one per input element for reductions and normalizations. Bytes are every tensor
input read once and every output written once, at their dtypes (a lookup such as embedding reads
only the rows it gathers); views and size arithmetic move nothing. An op the model does not know
counts zero and is listed by name in `GraphCost.unknown`, never guessed.

A region (a fused group, an ONNX Runtime node, a kernel) moves only what crosses its boundary:
`region_cost` counts its FLOPs and those bytes; the whole graph as one region is the least any
execution must move (weights, inputs, outputs).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import sympy
import torch

from blade.ir.fused import FusedRegion
from blade.ir.graph import Graph, Node, ScalarMeta, TensorMeta
from blade.ops.attention import FLASH_ATTENTION
from blade.ops.info import (ASSERTS, ATTENTIONS, CASTS, CLONES, CONVOLUTIONS, ELEMENTWISE, EMBEDDING_BAGS, FACTORIES,
                            GATHERS, LOG_SOFTMAXES, MATMULS, NORMS, POOLS, REARRANGES, REDUCTIONS, SIZE_QUERIES,
                            SOFTMAXES, SPLITS, arg)
from blade.ops.quantized import Q4LINEAR, QEMBEDDING, QLINEAR
from blade.ir.shapes import Size, evaluate

aten = torch.ops.aten


@dataclass(frozen=True)
class Cost:
    """FLOPs and minimum bytes of one node (ints or sympy expressions)."""

    flops: Size = 0
    bytes: Size = 0


@dataclass
class GraphCost:
    """Totals, per-node costs and the ops the model did not know (counted as zero)."""

    flops: Size
    bytes: Size
    nodes: dict[str, Cost] = field(default_factory=dict)
    unknown: dict[str, int] = field(default_factory=dict)  # op name -> how many nodes

    def at(self, dims: dict[str, int]) -> tuple[int, int]:
        """(FLOPs, bytes) with every dynamic dim bound."""
        return evaluate(_size(self.flops), dims), evaluate(_size(self.bytes), dims)


def _size(expr) -> Size:
    expr = sympy.expand(expr)
    return int(expr) if expr.is_Integer else expr


def numel(meta: TensorMeta) -> Size:
    return math.prod(meta.shape) if meta.shape else 1


def tensor_bytes(meta: TensorMeta) -> Size:
    return numel(meta) * meta.dtype.itemsize


def _tensor_metas(val) -> list[TensorMeta]:
    if isinstance(val, TensorMeta):
        return [val]
    if isinstance(val, (tuple, list)):
        return [m for v in val for m in _tensor_metas(v)]
    return []


# Lookups read from their table (first argument) only the elements they write, not all of it.
LOOKUPS = GATHERS | {QEMBEDDING}


def read_bytes(node: Node, ref: Node) -> Size:
    """The bytes `node` reads of `ref`: all of it, or as much as it writes when it gathers from it."""
    if node.target in LOOKUPS and node.args and node.args[0] is ref and isinstance(node.val, TensorMeta):
        return numel(node.val) * ref.val.dtype.itemsize  # the elements gathered, at the table's dtype
    return sum((tensor_bytes(m) for m in _tensor_metas(ref.val)), 0)


def io_bytes(node: Node) -> Size:
    """Every tensor the node reads (each once) plus every tensor it writes, at their dtypes."""
    read = sum((read_bytes(node, ref) for ref in node.refs()), 0)
    return read + sum((tensor_bytes(m) for m in _tensor_metas(node.val)), 0)


def _shape(node_arg) -> tuple:
    return node_arg.val.shape


# -- FLOP rules ------------------------------------------------------------------------------

def _linear(node: Node) -> Size:
    """linear, and blade::qlinear (its scales are not counted): the matmul and the bias."""
    out = numel(node.val)
    return 2 * out * _shape(arg(node, "weight"))[-1] + (out if arg(node, "bias") is not None else 0)


def _q4linear(node: Node) -> Size:
    """blade::q4linear: the matmul over x's features (the packed weight holds two a byte) and the bias."""
    out = numel(node.val)
    return 2 * out * _shape(node.args[0])[-1] + (out if arg(node, "bias") is not None else 0)


def _addmm(node: Node) -> Size:
    """addmm and baddbmm: the matmul and the added input."""
    return 2 * numel(node.val) * _shape(node.args[1])[-1] + numel(node.val)


def _matmul(node: Node) -> Size:
    """2 x output elements x the contracted length (mm, bmm, matmul with broadcast batch dims)."""
    a = node.args[0]
    return 2 * numel(node.val) * _shape(a)[-1]


def _convolution(node: Node) -> Size:
    per_output = math.prod(_shape(arg(node, "weight"))[1:])  # input channels per group x kernel window
    out = numel(node.val)
    return 2 * out * per_output + (out if arg(node, "bias") is not None else 0)


def attention_flops(batch, heads, q_len, k_len, head_dim, v_dim, causal: bool) -> Size:
    """QKᵀ and PV: 2·B·H·Sq·Sk·(D + Dv); causal with Sq = Sk = S counts the S(S+1)/2 scores it
    computes (causal with other lengths is counted in full: an upper bound)."""
    if causal and sympy.sympify(q_len - k_len) == 0:
        scores = sympy.sympify(q_len) * (q_len + 1) / 2
    else:
        scores = q_len * k_len
    return _size(2 * batch * heads * scores * (head_dim + v_dim))


def _flash_attention(node: Node) -> Size:
    q, k, v = node.args[:3]
    causal = bool(arg(node, "causal"))
    batch, heads, q_len, head_dim = _shape(q)
    return attention_flops(batch, heads, q_len, _shape(k)[2], head_dim, _shape(v)[-1], causal)


def _sdpa(node: Node) -> Size:
    q, k, v = node.args[:3]
    causal = bool(arg(node, "is_causal"))
    *batch, q_len, head_dim = _shape(q)
    return attention_flops(math.prod(batch), 1, q_len, _shape(k)[-2], head_dim, _shape(v)[-1], causal)


def _per_output_element(node: Node) -> Size:
    return sum((numel(m) for m in _tensor_metas(node.val)), 0)


def _per_input_element(node: Node) -> Size:
    return numel(node.args[0].val)


def _nothing(node: Node) -> Size:
    return 0


# Reductions, normalizations, pools and bags: one FLOP per input element.
ROW_OPS = REDUCTIONS | SOFTMAXES | LOG_SOFTMAXES | NORMS | POOLS | EMBEDDING_BAGS
# Data movement: no arithmetic, but the bytes count (a copy reads and writes every element).
MOVES = CASTS | CLONES | GATHERS | FACTORIES | {
    aten.cat.default, aten.stack.default, aten.repeat_interleave.self_int, aten.repeat.default, aten.tril.default,
    aten.triu.default, aten.constant_pad_nd.default,
}
MATMUL_RULES = {**{op: _matmul for op in MATMULS}, aten.linear.default: _linear, QLINEAR: _linear, Q4LINEAR: _q4linear,
                aten.addmm.default: _addmm, aten.baddbmm.default: _addmm}
ATTENTION_RULES = {FLASH_ATTENTION: _flash_attention, aten.scaled_dot_product_attention.default: _sdpa}
FLOP_RULES = {
    **MATMUL_RULES, **ATTENTION_RULES,
    **{op: _convolution for op in CONVOLUTIONS},
    **{op: _per_output_element for op in ELEMENTWISE},
    **{op: _per_input_element for op in ROW_OPS},
    **{op: _nothing for op in MOVES},
    QEMBEDDING: _per_output_element,  # the scale multiply
}
# Views, size arithmetic and checks: no FLOPs and no bytes.
FREE = REARRANGES | SPLITS | SIZE_QUERIES | ASSERTS | {
    aten.dropout.default, aten.flatten.using_ints, aten.unflatten.int, aten.slice.Tensor, aten.select.int,
    aten.detach.default, operator.getitem, operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod,
    operator.truediv, operator.neg,
}


def node_cost(node: Node) -> Cost | None:
    """The node's cost; None when the model does not know its op."""
    if isinstance(node.target, FusedRegion):
        return fused_cost(node.target)
    if node.op != "call" or node.target in FREE or isinstance(node.val, ScalarMeta):
        return Cost()
    rule = FLOP_RULES.get(node.target)
    if rule is None:
        return None
    return Cost(_size(rule(node)), _size(io_bytes(node)))


def fused_cost(region: FusedRegion) -> Cost | None:
    """A fused region's cost: its ops' FLOPs, and only the bytes that cross its boundary (what
    fusing saves is the traffic of the values that stay inside). None if an op is unknown."""
    body = region.body
    costs = graph_cost(body)
    if costs.unknown:
        return None
    return region_cost(body, body.call_nodes, costs)


def unfused_bytes(node: Node, costs: GraphCost) -> Size:
    """What the node would move op by op: a fused node's body ops each on their own."""
    if isinstance(node.target, FusedRegion):
        return graph_cost(node.target.body).bytes
    return costs.nodes[node.name].bytes


def op_name(node: Node) -> str:
    target = node.target
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", repr(target))


KINDS = {**{op: "attention" for op in ATTENTIONS}, **{op: "conv" for op in CONVOLUTIONS},
         **{op: "matmul" for op in MATMUL_RULES}, **{op: "reduction" for op in ROW_OPS},
         **{op: "elementwise" for op in ELEMENTWISE}, **{op: "move" for op in MOVES}, **{op: "view" for op in FREE}}
# A region's kind is its most telling member's: attention over matmul over … over views.
KIND_ORDER = ("attention", "conv", "matmul", "reduction", "elementwise", "move", "unknown", "view")


# A fused region's cost kind, by its fusion kind.
FUSED_KINDS = {"loop": "elementwise", "reduction": "reduction", "matmul_epilogue": "matmul"}


def node_kind(node: Node) -> str:
    if node.op != "call" or isinstance(node.val, ScalarMeta):
        return "view"
    if isinstance(node.target, FusedRegion):
        return FUSED_KINDS[node.target.kind]
    return KINDS.get(node.target, "unknown")


def region_kind(nodes) -> str:
    """The first of KIND_ORDER among the nodes' kinds; "runtime" for a region with no IR node."""
    kinds = {node_kind(n) for n in nodes}
    return next((k for k in KIND_ORDER if k in kinds), "runtime")


def _aliases(node: Node) -> bool:
    """A view or size node: its output is (part of) an input's memory, or a Python number."""
    return node.op == "call" and (node.target in FREE or isinstance(node.val, ScalarMeta) or node.val is None)


def region_cost(graph: Graph, members, costs: GraphCost | None = None) -> Cost:
    """FLOPs of the member nodes and the bytes that cross the region's boundary.

    Views alias their source: a region reads each outside tensor its computing nodes use (through
    any views: a slice reads its part, an expand no more than its source) at most once, and writes
    what they produce that is returned or read by a computing node outside.
    """
    costs = costs or graph_cost(graph)
    inside = {n for n in members if not _aliases(n)}
    flops = sum((costs.nodes[n.name].flops for n in members if n.name in costs.nodes), 0)
    reads: dict[Node, list[Size]] = {}  # outside tensor -> the bytes each use of it reads
    for node in inside:
        for ref in node.refs():
            root = _root(ref)
            if root not in inside and _tensor_metas(ref.val):
                reads.setdefault(root, []).append(read_bytes(node, ref))
    read = sum((_at_most(sum(parts, 0), _value_bytes(root)) for root, parts in reads.items()), 0)
    written = sum((_written_bytes(graph, n, inside) for n in inside), 0)
    return Cost(_size(flops), _size(read + written))


def _value_bytes(node: Node) -> Size:
    return sum((tensor_bytes(m) for m in _tensor_metas(node.val)), 0)


def _at_most(size: Size, cap: Size) -> Size:
    if size == cap:
        return size
    if isinstance(size, int) and isinstance(cap, int):
        return min(size, cap)
    return sympy.Min(size, cap)


def _root(node: Node) -> Node:
    """The computing node (or input, or weight) whose memory a chain of views reads."""
    while _aliases(node) and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _written_bytes(graph: Graph, node: Node, inside: set[Node]) -> Size:
    """The bytes of the node's outputs that escape the region (each element of a tuple on its own)."""
    if isinstance(node.val, tuple) and not graph.is_output(node):
        parts = [u for u in graph.users(node) if u.target is operator.getitem and isinstance(u.val, TensorMeta)]
        return sum((tensor_bytes(u.val) for u in parts if _escapes(graph, u, inside)), 0)
    return _value_bytes(node) if _escapes(graph, node, inside) else 0


def _escapes(graph: Graph, node: Node, inside: set[Node]) -> bool:
    """Whether the node's value (or a view of it) is returned or read by a computing node outside;
    size queries (sym_size) and views that only take its sizes do not count."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if graph.is_output(current):
            return True
        for user in graph.users(current):
            if user in seen or isinstance(user.val, ScalarMeta) or user.val is None:
                continue
            seen.add(user)
            if _aliases(user):
                if user.args and user.args[0] is current:
                    stack.append(user)
            elif user not in inside:
                return True
    return False


def graph_cost(graph: Graph) -> GraphCost:
    """Every call node's cost and the graph's totals; unknown ops counted zero and listed."""
    nodes, unknown = {}, {}
    flops: Size = 0
    moved: Size = 0
    for node in graph.call_nodes:
        cost = node_cost(node)
        if cost is None:
            unknown[op_name(node)] = unknown.get(op_name(node), 0) + 1
            cost = Cost()
        nodes[node.name] = cost
        flops, moved = flops + cost.flops, moved + cost.bytes
    return GraphCost(_size(flops), _size(moved), nodes, unknown)

