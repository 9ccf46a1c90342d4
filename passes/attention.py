"""Attention substitution: replace every attention written out op by op, and every SDPA call, by
one `blade::flash_attention`, which never materializes the [q_seq, k_seq] scores.

Matches, anchored on each softmax over the last axis:
    q @ kᵀ  (matmul or bmm, rank 3 or 4; kᵀ a transpose/permute view, or any [.., D, Sk] tensor)
    → any chain of: scale (mul/div by a number or a size-only scalar, on the scores or folded
      into q or k), additive float mask (add), boolean mask (masked_fill or where with -inf; with
      a finite "never" value such as finfo.min only when the mask proves causal), casts (fp32 upcast)
    → softmax(dim=-1)  → optional cast back, eval dropout, clone
    → @ v
  K/V heads repeated for grouped-query attention (repeat_interleave on the head axis, an expand
  of a size-1 head axis, or HF's unsqueeze-expand-reshape) are read without the repeat. A boolean
  or float mask computed from sizes alone (tril/triu/arange comparisons), with sizes used only as
  extents, is evaluated at two small sizes and at the dims' largest, and when it is the causal
  pattern it becomes `causal=True` with no mask tensor at all.
  `aten.scaled_dot_product_attention` maps to the same op. q, k, v stay the strided views the model
  made (no copies); the op's output is laid out [B, Sq, Hq, Dv], so the usual clone after the
  transpose back to [B, Sq, Hq, Dv] is dropped, and every `view` downstream becomes a `reshape`
  (a view where the layout allows, a copy where it does not).

Leaves alone (listed in the pass notes with the reason): a softmax over another axis, scores or
probabilities read by anything else (returned attention weights), a scale that is not a positive
constant, a fill that is not "never" (or is finite on a mask that is not causal), a batch or head
broadcast the op does not take, an output dtype other than q's, SDPA with dropout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from blade.ir.graph import Graph, Node, ScalarMeta, TensorMeta, iter_refs, map_refs
from blade.ops.attention import FLASH_ATTENTION
from blade.passes.cleanup import eliminate_dead_code
from blade.passes.manager import PassContext
from blade.ir.shapes import evaluate, is_static, same_shape, same_size

aten = torch.ops.aten

SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
CAST_OPS = {aten._to_copy.default, aten.to.dtype, torch.ops.prims.convert_element_type.default}
COPY_OPS = {aten.clone.default, aten.contiguous.default}  # contiguous: torch.export's training IR keeps it
PASS_THROUGH_OPS = CAST_OPS | COPY_OPS | {aten.alias.default, aten.dropout.default}
WHERE_OPS = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar}
RESHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# A masked_fill value at or below this is "never attend" (finfo(fp32).min, -inf); a finite one only
# when the mask is causal (no row has every key masked, where finite and -inf fills differ).
MASK_OUT = -1e30
SIZE_ONLY_MAX_NODES = 64
# A size-only mask is evaluated at these sizes and at the largest its dims may take, up to
# CAUSAL_CHECK_MAX; a mask whose seq may exceed that stays explicit (a sliding window wider than
# every size checked would look causal). See EXTENT_ARGS for why the largest size settles it.
SIZE_SAMPLES = (7, 12)
CAUSAL_CHECK_MAX = 8192


HELD_BACK = "held back by the accuracy bisection"


class NoMatch(Exception):
    """This softmax is not attention the pass can replace; the message says why."""


@dataclass
class Attention:
    """What one matched attention computes, in the op's terms."""

    q: Node
    k: Node
    v: Node
    scale: float = 1.0
    additive: list[Node] = field(default_factory=list)
    allowed: list[Node] = field(default_factory=list)  # bool masks, True = may attend
    disallowed: list[Node] = field(default_factory=list)  # bool masks, True = masked out
    causal: bool = False
    groups: int = 1
    notes: list[str] = field(default_factory=list)
    finite_fills: list[Node] = field(default_factory=list)  # masks filled with a finite value, not -inf


# -- evaluating what depends on sizes alone -----------------------------------------------------

class SizeOnly:
    """Evaluates nodes that depend only on dynamic sizes and constants, at a few sample sizes."""

    def __init__(self, graph: Graph):
        self.graph = graph
        # each dim a different value (a mask mixing two dims must not look like one of them)
        self.samples = [{name: _clamp(value + 2 * i, rng) for i, (name, rng) in enumerate(sorted(graph.dims.items()))}
                        for value in (*SIZE_SAMPLES, CAUSAL_CHECK_MAX)]
        self._memo: dict[tuple[str, int], Any] = {}

    def values(self, node: Node) -> list | None:
        """The node's value at each sample, or None when it reads input data or is too big to evaluate."""
        if _ancestors(self.graph, node, SIZE_ONLY_MAX_NODES) is None:
            return None
        try:
            return [self._value(node, i) for i in range(len(self.samples))]
        except _NotSizeOnly:
            return None
        except Exception:  # noqa: BLE001 - an op that cannot run on sample sizes is simply not size-only
            return None

    def _value(self, node: Node, sample: int):
        key = (node.name, sample)
        if key not in self._memo:
            self._memo[key] = self._compute(node, sample)
        return self._memo[key]

    def _compute(self, node: Node, sample: int):
        if node.op == "input":
            raise _NotSizeOnly
        if node.op == "constant":
            tensor = self.graph.constants[node.name]
            if tensor.numel() > 4 * 1024 * 1024:
                raise _NotSizeOnly
            return tensor.cpu()
        if node.target is aten.sym_size.int and isinstance(node.val, ScalarMeta) and node.val.value is not None:
            return evaluate(node.val.value, self.samples[sample])
        if isinstance(node.val, ScalarMeta) and node.val.value is not None and is_static(node.val.value):
            return node.val.value
        resolve = lambda n: self._value(n, sample)  # noqa: E731
        args, kwargs = map_refs(node.args, resolve), map_refs(node.kwargs, resolve)
        if "device" in kwargs:  # a mask built on the GPU is evaluated on the CPU
            kwargs["device"] = torch.device("cpu")
        return node.target(*args, **kwargs)


class _NotSizeOnly(Exception):
    pass


def _clamp(value: int, rng) -> int:
    value = value if rng.min is None else max(value, rng.min)
    return value if rng.max is None else min(value, rng.max)


def _ancestors(graph: Graph, node: Node, limit: int) -> set | None:
    seen, stack = {node}, [node]
    while stack:
        for pred in graph.nx.predecessors(stack.pop()):
            if pred not in seen:
                seen.add(pred)
                if len(seen) > limit:
                    return None
                stack.append(pred)
    return seen


def scalar_of(sizes: SizeOnly, arg) -> float | None:
    """A number, or a one-element tensor that depends on sizes alone and is the same at every sample."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    if isinstance(arg, Node) and isinstance(arg.val, TensorMeta) and all(
            is_static(s) and s == 1 for s in arg.val.shape):
        values = sizes.values(arg)
        if values:
            floats = {float(v.reshape(())) if isinstance(v, torch.Tensor) else float(v) for v in values}
            if len(floats) == 1:
                return floats.pop()
    return None


# -- matching ------------------------------------------------------------------------------

def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _single_user(graph: Graph, node: Node, user: Node) -> None:
    users = graph.users(node)
    if graph.is_output(node) or any(u is not user for u in users):
        others = [u.name for u in users if u is not user] + (["<outputs>"] if graph.is_output(node) else [])
        raise NoMatch(f"{node.name} is also read by {', '.join(others)}")


def _is_cast(node: Node) -> bool:
    if node.target not in CAST_OPS:
        return False
    extra = set(node.kwargs) - {"dtype", "memory_format", "layout", "device"}
    return not extra and isinstance(node.val, TensorMeta) and node.val.dtype.is_floating_point


def _is_pass_through(node: Node) -> bool:
    if node.target is aten.dropout.default:
        return _arg(node, 2, "train") is False or _arg(node, 1, "p") == 0
    if node.target in COPY_OPS or node.target is aten.alias.default:
        return True
    return _is_cast(node)


def _softmax_dim(node: Node) -> int:
    dim = _arg(node, 1, "dim")
    return dim + node.val.rank if dim < 0 else dim


def match_softmax(graph: Graph, sizes: SizeOnly, softmax: Node) -> tuple[Attention, Node]:
    """The attention around `softmax` and the node it replaces (the probabilities @ v)."""
    scores_in = softmax.args[0]
    rank = softmax.val.rank
    if _softmax_dim(softmax) != rank - 1:
        raise NoMatch(f"softmax over dim {_arg(softmax, 1, 'dim')}, not the last (key) axis")
    probs, out = _follow_down(graph, softmax)
    if out.target not in MATMUL_OPS or out.args[0] is not probs or out.args[1] is probs:
        raise NoMatch("its output is not multiplied by the values (no probs @ v)")
    att = Attention(q=None, k=None, v=out.args[1])  # type: ignore[arg-type]
    qk = _follow_up(graph, sizes, softmax, scores_in, att)
    q, kt = qk.args[0], qk.args[1]
    if not (isinstance(q, Node) and isinstance(kt, Node)):
        raise NoMatch("q @ kᵀ does not read two tensors")
    if q.val.rank != rank or kt.val.rank != rank or att.v.val.rank != rank or rank not in (3, 4):
        raise NoMatch(f"q, kᵀ, v of rank {q.val.rank}, {kt.val.rank}, {att.v.val.rank}: only rank 3 or 4")
    att.q = _absorb_scale(graph, sizes, q, qk, att)
    att.k = _untranspose(graph, sizes, kt, qk, att)
    if out.val.dtype != q.val.dtype:
        raise NoMatch(f"attention output is {out.val.dtype} but q is {q.val.dtype}")
    _check_shapes(att, softmax, out)
    return att, out


def _follow_down(graph: Graph, softmax: Node) -> tuple[Node, Node]:
    """(the last cast/dropout/clone after the softmax, the one node that reads it)."""
    node = softmax
    while True:
        users = graph.users(node)
        if len(users) != 1 or graph.is_output(node):
            raise NoMatch(f"the probabilities {node.name} are read by more than the values product")
        (user,) = users
        if _is_pass_through(user) and user.args[0] is node:
            node = user
            continue
        return node, user


def _follow_up(graph: Graph, sizes: SizeOnly, softmax: Node, node: Node, att: Attention) -> Node:
    """Walk from the softmax input to q @ kᵀ, collecting scale and masks in att."""
    below = softmax
    while True:
        if not isinstance(node, Node):
            raise NoMatch("the scores are not a tensor node")
        _single_user(graph, node, below)
        if node.target in MATMUL_OPS:
            return node
        if _is_pass_through(node):
            below, node = node, node.args[0]
            continue
        if node.target in (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar):
            below, node = node, _take_scale(sizes, node, att)
            continue
        if node.target in (aten.add.Tensor, aten.add.Scalar):
            below, node = node, _take_additive(sizes, node, att)
            continue
        if node.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            _take_fill(att, node, node.args[1], scalar_of(sizes, node.args[2]), "disallowed")
            below, node = node, node.args[0]
            continue
        if node.target in WHERE_OPS:
            below, node = node, _take_where(sizes, node, att)
            continue
        raise NoMatch(f"{node.name} ({node.target}) between q @ kᵀ and softmax is not a scale, mask or cast")


def _take_scale(sizes: SizeOnly, node: Node, att: Attention) -> Node:
    a, b = node.args[0], node.args[1]
    divide = node.target in (aten.div.Tensor, aten.div.Scalar)
    if isinstance(b, Node) and scalar_of(sizes, b) is None and not divide:
        a, b = b, a  # the constant may be on the left of a multiply
    factor = scalar_of(sizes, b)
    if factor is None or not isinstance(a, Node) or factor == 0:
        raise NoMatch(f"{node.name} scales the scores by something that is not a constant")
    factor = 1.0 / factor if divide else factor
    if factor <= 0 or not math.isfinite(factor):
        raise NoMatch(f"{node.name} scales the scores by {factor}, not a positive number")
    att.scale *= factor
    return a


@dataclass
class _Scaled:
    """An additive mask that scales met nearer the softmax multiply by `factor` (applied when built)."""

    mask: Node
    factor: float


def _take_additive(sizes: SizeOnly, node: Node, att: Attention) -> Node:
    a, b = node.args[0], node.args[1]
    if _arg(node, 2, "alpha", 1) != 1:
        raise NoMatch(f"{node.name} adds with alpha")
    if not isinstance(a, Node) or (isinstance(b, Node) and b.val.rank > a.val.rank):
        a, b = b, a
    if not isinstance(a, Node):
        raise NoMatch(f"{node.name} adds two non-tensors")
    shift = scalar_of(sizes, b)
    if shift is not None:
        if not math.isfinite(shift):
            raise NoMatch(f"{node.name} adds {shift} to every score")
        return a  # a constant shift of every score: softmax ignores it
    if not same_shape(node.val.shape, a.val.shape):
        raise NoMatch(f"{node.name}: the mask {b.name} broadcasts the scores to a larger shape")
    if not b.val.dtype.is_floating_point:
        raise NoMatch(f"{node.name} adds a {b.val.dtype} tensor")
    att.additive.append(b if att.scale == 1.0 else _Scaled(b, att.scale))
    return a


def _is_mask_out(value: float | None) -> bool:
    return value is not None and not math.isnan(value) and value <= MASK_OUT


def _take_fill(att: Attention, node: Node, mask: Node, fill: float | None, polarity: str) -> None:
    """Record a boolean mask that fills the scores with -inf (or a finite "never attend" value)."""
    if not _is_mask_out(fill):
        raise NoMatch(f"{node.name} fills with {fill!r}, not -inf")
    getattr(att, polarity).append(mask)
    if not math.isinf(fill):
        # exact only where some key stays unmasked in every row: a fully masked row of finite fills
        # is uniform in eager, zeros in the op; so the mask must turn out to be the causal one
        att.finite_fills.append(mask)


def _take_where(sizes: SizeOnly, node: Node, att: Attention) -> Node:
    cond, yes, no = node.args
    no_value, yes_value = scalar_of(sizes, no), scalar_of(sizes, yes)
    if isinstance(yes, Node) and _is_mask_out(no_value):
        _take_fill(att, node, cond, no_value, "allowed")
        scores = yes
    elif isinstance(no, Node) and _is_mask_out(yes_value):
        _take_fill(att, node, cond, yes_value, "disallowed")
        scores = no
    else:
        raise NoMatch(f"{node.name} is a where() that does not mask with -inf")
    if not same_shape(node.val.shape, scores.val.shape):
        raise NoMatch(f"{node.name}: the mask broadcasts the scores to a larger shape")
    return scores


def _absorb_scale(graph: Graph, sizes: SizeOnly, x: Node, reader: Node, att: Attention) -> Node:
    """x, or what x scales by a positive constant (folding the constant into att.scale)."""
    while x.target in (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar) and \
            len(graph.users(x)) == 1 and not graph.is_output(x):
        probe = Attention(q=None, k=None, v=None)  # type: ignore[arg-type]
        try:
            inner = _take_scale(sizes, x, probe)
        except NoMatch:
            break
        if inner.val.dtype != x.val.dtype or not same_shape(inner.val.shape, x.val.shape):
            break
        att.scale *= probe.scale
        x = inner
    return x


def _untranspose(graph: Graph, sizes: SizeOnly, kt: Node, qk: Node, att: Attention) -> Node:
    """k in [.., Sk, D] from kᵀ in [.., D, Sk], looking through the transposing view."""
    rank = kt.val.rank
    if kt.target is aten.transpose.int:
        dims = {d % rank for d in kt.args[1:3]}
        if dims == {rank - 2, rank - 1}:
            return _absorb_scale(graph, sizes, kt.args[0], kt, att)
    if kt.target is aten.permute.default:
        perm = [d % rank for d in kt.args[1]]
        if perm[-2:] == [rank - 1, rank - 2] and perm[:-2] == list(range(rank - 2)):
            return _absorb_scale(graph, sizes, kt.args[0], kt, att)
    shape = (*kt.val.shape[:-2], kt.val.shape[-1], kt.val.shape[-2])
    return graph.add_node(aten.transpose.int, (kt, -2, -1),
                          meta={"val": TensorMeta(shape, kt.val.dtype, kt.val.device)}, name="k")


def _check_shapes(att: Attention, softmax: Node, out: Node) -> None:
    q, k, v = att.q.val.shape, att.k.val.shape, att.v.val.shape
    if not same_size(q[-1], k[-1]) or not same_size(k[-2], v[-2]):
        raise NoMatch(f"q {q}, k {k}, v {v} do not line up")
    if not (same_size(q[0], k[0]) and same_size(k[0], v[0])):
        raise NoMatch(f"the matmuls broadcast a batch dim (q {q}, k {k}, v {v}); the op takes equal batches")
    if len(q) == 4 and not same_size(k[1], v[1]):
        raise NoMatch(f"k {k} and v {v} have different head counts")
    if len(q) == 4 and not same_size(q[1], k[1]) and not (is_static(k[1]) and k[1] == 1):
        raise NoMatch(f"q {q} and k {k} have different head counts that are not a repeat the pass knows")
    if not same_shape(out.val.shape, (*q[:-1], v[-1])):
        raise NoMatch(f"output shape {out.val.shape} is not q's rows by v's columns")


# -- grouped-query attention ---------------------------------------------------------------

def strip_head_repeat(graph: Graph, x: Node) -> tuple[Node, int] | None:
    """(unrepeated, groups) when x repeats a [B, Hkv, S, D] tensor's heads `groups` times in a row."""
    if x.val.rank != 4:
        return None
    if x.target is aten.repeat_interleave.self_int and _arg(x, 2, "dim") in (1, -3) \
            and _arg(x, 3, "output_size") in (None, x.val.shape[1]):
        groups = x.args[1]
        return (x.args[0], groups) if isinstance(groups, int) else None
    if x.target is aten.expand.default:
        src = x.args[0]
        if src.val.rank == 4 and src.val.shape[1] == 1 and is_static(x.val.shape[1]) \
                and same_shape((src.val.shape[0], *src.val.shape[2:]), (x.val.shape[0], *x.val.shape[2:])):
            return src, x.val.shape[1]
    node = x
    if node.target in RESHAPE_OPS:
        node = node.args[0]
        if node.target in COPY_OPS:
            node = node.args[0]
        if node.target is aten.expand.default and node.val.rank == 5:
            src = node.args[0]
            if src.target is aten.unsqueeze.default and _arg(src, 1, "dim") in (2, -3):
                base = src.args[0]
                groups = node.val.shape[2]
                if is_static(groups) and same_shape(base.val.shape, (x.val.shape[0], node.val.shape[1],
                                                                     *x.val.shape[2:])):
                    return base, groups
    return None


def _strip_gqa(graph: Graph, att: Attention) -> None:
    k, v = strip_head_repeat(graph, att.k), strip_head_repeat(graph, att.v)
    if k and v and k[1] == v[1] and k[1] > 1:
        att.k, att.v, att.groups = k[0], v[0], k[1]
    elif att.k.val.rank == 4 and is_static(att.k.val.shape[1]) and att.k.val.shape[1] == 1 \
            and not same_size(att.q.val.shape[1], 1):
        att.groups = att.q.val.shape[1]  # one K/V head broadcast by the matmul: multi-query


# -- causal masks --------------------------------------------------------------------------

# Where a size may enter a causal-mask candidate: as an extent (how many), never as a value. Then
# each element depends on its (i, j) alone, the mask at a smaller size is the top-left block of
# the mask at a larger one, and matching tril at the dim's largest size proves it at every size.
EXTENT_ARGS = {
    aten.arange.default: {0}, aten.arange.start: {1}, aten.arange.start_step: {1}, aten.ones.default: {0},
    aten.zeros.default: {0}, aten.full.default: {0}, aten.empty.memory_format: {0}, aten.view.default: {1},
    aten.reshape.default: {1}, aten._unsafe_view.default: {1}, aten.expand.default: {1},
    aten.slice.Tensor: {3},
}


def _sizes_only_as_extents(graph: Graph, mask: Node) -> bool:
    """The mask's subgraph uses sizes only where EXTENT_ARGS allows, and no size arithmetic."""
    nodes = _ancestors(graph, mask, SIZE_ONLY_MAX_NODES) or set()
    for node in nodes:
        if node.op != "call" or node.target is aten.sym_size.int:
            continue
        if not isinstance(node.target, torch._ops.OpOverload):
            return False  # operator.add & co: arithmetic on sizes
        extents = EXTENT_ARGS.get(node.target, set())
        for i, arg in enumerate(node.args):
            scalars = [r for r in iter_refs(arg) if isinstance(r.val, ScalarMeta)]
            if scalars and i not in extents:
                return False
        if any(isinstance(r.val, ScalarMeta) for r in iter_refs(node.kwargs)):
            return False
    return True


def _causal_kind(sizes: SizeOnly, mask: Node, q_len, k_len) -> str | None:
    """'allowed' / 'disallowed' / 'additive' when the size-only mask is exactly the causal pattern."""
    if not same_size(q_len, k_len) or not _sizes_only_as_extents(sizes.graph, mask):
        return None
    values = sizes.values(mask)
    if values is None:
        return None
    kinds = set()
    for value, sample in zip(values, sizes.samples):
        n = evaluate(q_len, sample)
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or tuple(value.shape[-2:]) != (n, n) \
                or value.numel() != n * n:
            return None
        value = value.reshape(n, n)
        tril = torch.ones(n, n, dtype=torch.bool).tril()
        if value.dtype == torch.bool:
            kinds.add("allowed" if torch.equal(value, tril) else "disallowed" if torch.equal(value, ~tril) else None)
        elif value.dtype.is_floating_point:
            ok = torch.equal(value[tril], torch.zeros_like(value[tril])) and bool((value[~tril] <= MASK_OUT).all())
            kinds.add("additive" if ok else None)
        else:
            return None
    return kinds.pop() if len(kinds) == 1 and None not in kinds else None


def _checkable(graph: Graph, size) -> bool:
    """Every dim in `size` is bounded by CAUSAL_CHECK_MAX, the largest size a causal check evaluates."""
    if is_static(size):
        return size <= CAUSAL_CHECK_MAX
    ranges = [graph.dims.get(s.name) for s in size.free_symbols]
    return all(r is not None and r.max is not None and r.max <= CAUSAL_CHECK_MAX for r in ranges)


def _find_causal(sizes: SizeOnly, att: Attention, q_len, k_len) -> None:
    if not _checkable(sizes.graph, q_len):
        if any(sizes.values(m.mask if isinstance(m, _Scaled) else m) is not None
               for m in att.allowed + att.disallowed + att.additive):
            att.notes.append(f"its size-only mask stays explicit: seq {q_len} may exceed {CAUSAL_CHECK_MAX}, the "
                             "largest size blade checks a causal pattern at (declare a max on the Dim)")
        return
    for masks, kind in ((att.allowed, "allowed"), (att.disallowed, "disallowed"), (att.additive, "additive")):
        for mask in list(masks):
            plain = mask.mask if isinstance(mask, _Scaled) else mask
            if _causal_kind(sizes, plain, q_len, k_len) == kind:
                masks.remove(mask)
                att.causal = True
                return


# -- building the replacement --------------------------------------------------------------

def _meta(shape, dtype, device) -> dict:
    return {"val": TensorMeta(tuple(shape), dtype, device)}


def _broadcast(a, b):
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + tuple(a), (1,) * (rank - len(b)) + tuple(b)
    return tuple(y if (is_static(x) and x == 1) else x for x, y in zip(a, b))


def build_mask(graph: Graph, att: Attention, dtype, device) -> Node | None:
    """One mask for the op: bool when only bool masks remain, else an additive float mask."""
    allowed = list(att.allowed)
    for mask in att.disallowed:
        allowed.append(graph.add_node(aten.logical_not.default, (mask,),
                                      meta=_meta(mask.val.shape, torch.bool, mask.val.device), name="allowed"))
    combined = None
    for mask in allowed:
        combined = mask if combined is None else graph.add_node(
            aten.logical_and.default, (combined, mask),
            meta=_meta(_broadcast(combined.val.shape, mask.val.shape), torch.bool, device), name="allowed")
    additive = None
    for mask in att.additive:
        node, factor = (mask.mask, mask.factor) if isinstance(mask, _Scaled) else (mask, 1.0)
        if factor != 1.0:
            node = graph.add_node(aten.mul.Tensor, (node, factor), meta=_meta(node.val.shape, node.val.dtype, device),
                                  name="mask_scaled")
        additive = node if additive is None else graph.add_node(
            aten.add.Tensor, (additive, node), meta=_meta(_broadcast(additive.val.shape, node.val.shape),
                                                         torch.promote_types(additive.val.dtype, node.val.dtype),
                                                         device), name="mask")
    if additive is None:
        return combined
    if combined is not None:
        additive = graph.add_node(
            aten.masked_fill.Scalar, (additive, graph.add_node(
                aten.logical_not.default, (combined,), meta=_meta(combined.val.shape, torch.bool, device),
                name="disallowed"), float("-inf")),
            meta=_meta(_broadcast(additive.val.shape, combined.val.shape), additive.val.dtype, device), name="mask")
    return additive


def _to_4d(graph: Graph, x: Node | None) -> Node | None:
    """x with leading size-1 axes up to rank 4 (how it broadcasts against [B, H, Sq, Sk] anyway)."""
    while x is not None and x.val.rank < 4:
        x = graph.add_node(aten.unsqueeze.default, (x, 0), meta=_meta((1, *x.val.shape), x.val.dtype, x.val.device),
                           name=f"{x.name}_4d")
    return x


def build(graph: Graph, att: Attention, out: Node) -> Node:
    """Insert blade::flash_attention for att and route out's readers to it."""
    device = att.q.val.device
    mask = build_mask(graph, att, att.q.val.dtype, device)
    q, k, v = att.q, att.k, att.v
    rank3 = q.val.rank == 3
    q, k, v, mask = (_to_4d(graph, x) for x in (q, k, v, mask))
    shape = (*q.val.shape[:-1], v.val.shape[-1])
    flash = graph.add_node(FLASH_ATTENTION, (q, k, v, mask, att.scale, att.causal),
                           meta=_meta(shape, att.q.val.dtype, device), name="flash_attention")
    result = flash
    if rank3:
        result = graph.add_node(aten.squeeze.dim, (flash, 0), meta=_meta(out.val.shape, out.val.dtype, device),
                                name="attention")
    graph.replace_all_uses(out, result)
    return flash


def absorb_output_copy(graph: Graph, flash: Node, ctx: PassContext) -> None:
    """Drop the copy in `clone(flash.transpose(1, 2))`: the op's output memory is [B, Sq, Hq, Dv]
    already, so the transpose back to the model's layout is dense without it."""
    for transposed in graph.users(flash):
        if transposed.target is not aten.transpose.int or {d % 4 for d in transposed.args[1:3]} != {1, 2}:
            continue
        for copy in graph.users(transposed):
            memory_format = copy.kwargs.get("memory_format", torch.contiguous_format)
            if copy.target in COPY_OPS and memory_format in (torch.contiguous_format, None) \
                    and not graph.is_output(copy):
                graph.replace_all_uses(copy, transposed)
                ctx.count("output_copies_absorbed")


def describe(att: Attention, softmax: Node) -> str:
    parts = [f"scale={att.scale:.6g}"]
    if att.causal:
        parts.append("causal")
    if att.groups > 1:
        parts.append(f"gqa groups={att.groups}")
    masks = len(att.additive) + len(att.allowed) + len(att.disallowed)
    if masks:
        parts.append(f"{masks} mask{'s' if masks > 1 else ''}")
    return f"softmax {softmax.name} -> flash_attention ({', '.join(parts)})"


# -- SDPA ----------------------------------------------------------------------------------

def replace_sdpa(graph: Graph, node: Node, ctx: PassContext) -> Node:
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    dropout = _arg(node, 4, "dropout_p", 0.0)
    causal = bool(_arg(node, 5, "is_causal", False))
    scale = _arg(node, 6, "scale")
    if dropout:
        raise NoMatch(f"{node.name} has dropout_p={dropout}")
    if any(x.val.rank != 4 for x in (q, k, v)):
        raise NoMatch(f"{node.name} has inputs that are not 4-D")
    if causal and mask is not None:
        raise NoMatch(f"{node.name} has both a mask and is_causal")
    if scale is None:
        head_dim = q.val.shape[-1]
        if not is_static(head_dim):
            raise NoMatch(f"{node.name}: head dim {head_dim} is dynamic and no scale is given")
        scale = 1.0 / math.sqrt(head_dim)
    if not ctx.allows(node.name):
        raise NoMatch(HELD_BACK)
    flash = graph.add_node(FLASH_ATTENTION, (q, k, v, _to_4d(graph, mask), float(scale), causal),
                           meta=_meta(node.val.shape, node.val.dtype, node.val.device), name="flash_attention")
    graph.replace_all_uses(node, flash)
    return flash


STRIDE_BOUND_VIEWS = {aten.view.default, aten._unsafe_view.default}


def views_to_reshapes(graph: Graph, ctx: PassContext) -> None:
    """Let every `view` downstream of an attention op copy when it must.

    torch.export recorded `view` wherever the captured strides allowed one: after a matmul's dense
    output, or after SDPA, whose output strides follow its inputs and its kernel. The op's output is
    laid out [B, Sq, Hq, Dv], and elementwise ops pass a layout on, so a later view may not be
    possible; `reshape` is the same view where it is, a copy where it is not.
    """
    flash = [n for n in graph.call_nodes if n.target is FLASH_ATTENTION]
    downstream = set().union(*(nx.descendants(graph.nx, n) for n in flash)) if flash else set()
    for node in downstream:
        if node.target in STRIDE_BOUND_VIEWS:
            node.target = aten.reshape.default
            ctx.count("views_made_reshapes")


# -- the pass ------------------------------------------------------------------------------

def _describe_sdpa(sdpa: Node, flash: Node) -> str:
    return f"{sdpa.name} -> flash_attention (scale={flash.args[4]:.6g}{', causal' if flash.args[5] else ''})"


def replace_softmax(graph: Graph, sizes: SizeOnly, softmax: Node, ctx: PassContext) -> str:
    """Replace the attention around `softmax`; returns what it became (raises NoMatch)."""
    att, out = match_softmax(graph, sizes, softmax)
    _strip_gqa(graph, att)
    _find_causal(sizes, att, att.q.val.shape[-2], att.k.val.shape[-2])
    left = [m.name for m in att.finite_fills if any(m is x for x in att.allowed + att.disallowed)]
    if left:
        raise NoMatch(f"masks {left} fill with a finite value and are not causal: a row with every key masked "
                      "would average the values in eager and give zeros in the op")
    if not ctx.allows(softmax.name):
        raise NoMatch(HELD_BACK)
    absorb_output_copy(graph, build(graph, att, out), ctx)
    return "; ".join([describe(att, softmax), *att.notes])


def run(graph: Graph, ctx: PassContext) -> Graph:
    sizes = SizeOnly(graph)
    for node in graph.call_nodes:
        if node.target is aten.scaled_dot_product_attention.default:
            replace, left = lambda n: _describe_sdpa(n, replace_sdpa(graph, n, ctx)), "sdpa_left"
        elif node.target in SOFTMAX_OPS:
            replace, left = lambda n: replace_softmax(graph, sizes, n, ctx), "softmax_left"
        else:
            continue
        try:
            ctx.note(replace(node))
        except NoMatch as miss:
            ctx.count(left)
            ctx.note(f"left {node.name}: {miss}")
            continue
        ctx.count("attention_replaced")
    eliminate_dead_code(graph, ctx)  # the replaced ops, and anything a failed match had started
    views_to_reshapes(graph, ctx)
    return graph

