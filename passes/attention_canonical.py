"""Attention's canonical form: the rules that look through scales, masks, casts, transposes and no-op copies.

Before the attention core (`softmax(q @ kᵀ) @ v`, attention_match.py) is matched, these rules run
to a fixpoint on the ops around it, each named by what it reads the op as:

- on the probabilities, below the softmax: PROBABILITY_RULES (casts back, eval dropout, copies);
- on the scores, between q @ kᵀ and the softmax: SCORE_RULES (scales, additive and boolean masks,
  casts, eval dropout, copies), applied until q @ kᵀ is reached;
- on the operands of q @ kᵀ: a scale folded into q or k (OPERAND_SCALE), and kᵀ read as k through
  its transpose or permute (k_of).

A rule declines (the chain is not one the op can take) by raising NoMatch with the reason. Nothing
here touches the graph: what the rules read off is collected in a `Peeled` record, and a kᵀ that
is no transposing view becomes a planned `New` transpose, added only if the whole match commits.
(The ops are read through, not rewritten in place: a scale moved onto q in the graph would change
the numbers of an attention the pass then declines.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from blade.ir.graph import Graph, Node, TensorMeta
from blade.ir.shapes import same_shape
from blade.ops import info
from blade.ops.info import arg
from blade.passes.attention_sizes import SizeOnly, scalar_of
from blade.passes.rewrite import New

aten = torch.ops.aten
# A masked_fill value at or below this is "never attend" (finfo(fp32).min, -inf); a finite one only
# when the mask is causal (no row has every key masked, where finite and -inf fills differ).
MASK_OUT = -1e30
SCALES = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}
DIVIDES = {aten.div.Tensor, aten.div.Scalar}


class NoMatch(Exception):
    """This softmax is not attention the pass can replace; the message says why."""


@dataclass
class ScaledMask:
    """An additive mask that scales met nearer the softmax multiply by `factor` (applied when built)."""

    mask: Node
    factor: float


@dataclass
class Peeled:
    """What the rules read off the scores: the scale and the masks, in the op's terms."""

    scale: float = 1.0
    additive: list = field(default_factory=list)  # float masks (Node or ScaledMask)
    allowed: list[Node] = field(default_factory=list)  # bool masks, True = may attend
    disallowed: list[Node] = field(default_factory=list)  # bool masks, True = masked out
    finite_fills: list[Node] = field(default_factory=list)  # masks filled with a finite value, not -inf


# -- the ops that change nothing the op computes ------------------------------------------------

def is_cast(node: Node) -> bool:
    if node.target not in info.CASTS:
        return False
    extra = set(node.kwargs) - {"dtype", "memory_format", "layout", "device"}
    return not extra and isinstance(node.val, TensorMeta) and node.val.dtype.is_floating_point


def is_no_op(node: Node) -> bool:
    """A copy, alias or dropout in eval mode: the values pass through unchanged."""
    if node.target is aten.dropout.default:
        return arg(node, "train") is False or arg(node, "p") == 0
    return node.target in info.CLONES or node.target is aten.alias.default


def is_pass_through(node: Node) -> bool:
    return is_no_op(node) or is_cast(node)


# -- rules on the scores --------------------------------------------------------------------------

def take_scale(sizes: SizeOnly, node: Node, peeled: Peeled) -> Node:
    """s * c, c * s, s / c => s, with scale *= c (or 1/c); c a positive constant."""
    a, b = node.args[0], node.args[1]
    divide = node.target in DIVIDES
    if isinstance(b, Node) and scalar_of(sizes, b) is None and not divide:
        a, b = b, a  # the constant may be on the left of a multiply
    factor = scalar_of(sizes, b)
    if factor is None or not isinstance(a, Node) or factor == 0:
        raise NoMatch(f"{node.name} scales the scores by something that is not a constant")
    factor = 1.0 / factor if divide else factor
    if factor <= 0 or not math.isfinite(factor):
        raise NoMatch(f"{node.name} scales the scores by {factor}, not a positive number")
    peeled.scale *= factor
    return a


def take_additive(sizes: SizeOnly, node: Node, peeled: Peeled) -> Node:
    """s + mask => s, the mask kept (times the scale met so far); s + c => s (softmax ignores a shift)."""
    a, b = node.args[0], node.args[1]
    if arg(node, "alpha", 1) != 1:
        raise NoMatch(f"{node.name} adds with alpha")
    if not isinstance(a, Node) or (isinstance(b, Node) and b.val.rank > a.val.rank):
        a, b = b, a
    if not isinstance(a, Node):
        raise NoMatch(f"{node.name} adds two non-tensors")
    shift = scalar_of(sizes, b)
    if shift is not None:
        if not math.isfinite(shift):
            raise NoMatch(f"{node.name} adds {shift} to every score")
        return a
    if not same_shape(node.val.shape, a.val.shape):
        raise NoMatch(f"{node.name}: the mask {b.name} broadcasts the scores to a larger shape")
    if not b.val.dtype.is_floating_point:
        raise NoMatch(f"{node.name} adds a {b.val.dtype} tensor")
    peeled.additive.append(b if peeled.scale == 1.0 else ScaledMask(b, peeled.scale))
    return a


def _is_mask_out(value: float | None) -> bool:
    return value is not None and not math.isnan(value) and value <= MASK_OUT


def _take_fill(peeled: Peeled, node: Node, mask: Node, fill: float | None, polarity: str) -> None:
    """Record a boolean mask that fills the scores with -inf (or a finite "never attend" value)."""
    if not _is_mask_out(fill):
        raise NoMatch(f"{node.name} fills with {fill!r}, not -inf")
    getattr(peeled, polarity).append(mask)
    if not math.isinf(fill):
        # exact only where some key stays unmasked in every row: a fully masked row of finite fills
        # is uniform in eager, zeros in the op; so the mask must turn out to be the causal one
        peeled.finite_fills.append(mask)


def take_masked_fill(sizes: SizeOnly, node: Node, peeled: Peeled) -> Node:
    """masked_fill(s, m, -inf) => s, with m among the disallowed masks."""
    _take_fill(peeled, node, node.args[1], scalar_of(sizes, node.args[2]), "disallowed")
    return node.args[0]


def take_where(sizes: SizeOnly, node: Node, peeled: Peeled) -> Node:
    """where(m, s, -inf) => s with m allowed; where(m, -inf, s) => s with m disallowed."""
    cond, yes, no = node.args
    no_value, yes_value = scalar_of(sizes, no), scalar_of(sizes, yes)
    if isinstance(yes, Node) and _is_mask_out(no_value):
        _take_fill(peeled, node, cond, no_value, "allowed")
        scores = yes
    elif isinstance(no, Node) and _is_mask_out(yes_value):
        _take_fill(peeled, node, cond, yes_value, "disallowed")
        scores = no
    else:
        raise NoMatch(f"{node.name} is a where() that does not mask with -inf")
    if not same_shape(node.val.shape, scores.val.shape):
        raise NoMatch(f"{node.name}: the mask broadcasts the scores to a larger shape")
    return scores


def take_pass_through(sizes: SizeOnly, node: Node, peeled: Peeled) -> Node:
    """cast(s), clone(s), alias(s), dropout_eval(s) => s."""
    return node.args[0]


Rule = tuple[str, Callable[[Node], bool], Callable[[SizeOnly, Node, Peeled], Node]]
SCORE_RULES: list[Rule] = [
    ("cast(s), copy(s), dropout_eval(s) => s", is_pass_through, take_pass_through),
    ("s * c, s / c => s; scale *= c", lambda n: n.target in SCALES, take_scale),
    ("s + mask => s; masks += mask", lambda n: n.target in (aten.add.Tensor, aten.add.Scalar), take_additive),
    ("masked_fill(s, m, -inf) => s; disallowed += m", lambda n: n.target in info.MASKED_FILLS, take_masked_fill),
    ("where(m, s, -inf) => s; allowed += m", lambda n: n.target in info.WHERES, take_where),
]
PROBABILITY_RULES = [("cast(p), copy(p), dropout_eval(p) => p", is_pass_through)]


def _single_user(graph: Graph, node: Node, user: Node) -> None:
    users = graph.users(node)
    if graph.is_output(node) or any(u is not user for u in users):
        others = [u.name for u in users if u is not user] + (["<outputs>"] if graph.is_output(node) else [])
        raise NoMatch(f"{node.name} is also read by {', '.join(others)}")


def scores_product(graph: Graph, sizes: SizeOnly, softmax: Node, peeled: Peeled) -> Node:
    """From the softmax's input up to q @ kᵀ, through SCORE_RULES; the scale and masks go into `peeled`."""
    below, node = softmax, softmax.args[0]
    while True:
        if not isinstance(node, Node):
            raise NoMatch("the scores are not a tensor node")
        _single_user(graph, node, below)
        if node.target in info.BATCH_MATMULS:
            return node
        rule = next((take for _, applies, take in SCORE_RULES if applies(node)), None)
        if rule is None:
            raise NoMatch(f"{node.name} ({node.target}) between q @ kᵀ and softmax is not a scale, mask or cast")
        below, node = node, rule(sizes, node, peeled)


def probabilities_reader(graph: Graph, softmax: Node) -> tuple[Node, Node]:
    """(the last op PROBABILITY_RULES look through after the softmax, the one node that reads it)."""
    node = softmax
    while True:
        users = graph.users(node)
        if len(users) != 1 or graph.is_output(node):
            raise NoMatch(f"the probabilities {node.name} are read by more than the values product")
        (user,) = users
        if any(applies(user) for _, applies in PROBABILITY_RULES) and user.args[0] is node:
            node = user
            continue
        return node, user


# -- rules on the operands of q @ kᵀ ----------------------------------------------------------------

def operand_scale(graph: Graph, sizes: SizeOnly, x: Node, peeled: Peeled) -> Node:
    """c * x, x / c => x with scale *= c, repeatedly: a scale folded into q or k (OPERAND_SCALE)."""
    while x.target in SCALES and len(graph.users(x)) == 1 and not graph.is_output(x):
        probe = Peeled()
        try:
            inner = take_scale(sizes, x, probe)
        except NoMatch:
            break
        if inner.val.dtype != x.val.dtype or not same_shape(inner.val.shape, x.val.shape):
            break
        peeled.scale *= probe.scale
        x = inner
    return x


OPERAND_SCALE = "matmul(c * q, k) => matmul(q, k); scale *= c"


def _transposed_last_two(kt: Node) -> bool:
    rank = kt.val.rank
    if kt.target is aten.transpose.int:
        return {d % rank for d in kt.args[1:3]} == {rank - 2, rank - 1}
    if kt.target is aten.permute.default:
        perm = [d % rank for d in kt.args[1]]
        return perm[-2:] == [rank - 1, rank - 2] and perm[:-2] == list(range(rank - 2))
    return False


def k_of(graph: Graph, sizes: SizeOnly, kt: Node, peeled: Peeled) -> Node | New:
    """k in [.., Sk, D] from kᵀ in [.., D, Sk]: through its transpose/permute (and a scale on k), else a
    transpose the commit will add."""
    if isinstance(kt, Node) and _transposed_last_two(kt):
        return operand_scale(graph, sizes, kt.args[0], peeled)
    return New(aten.transpose.int, (kt, -2, -1), name="k")
