"""The attention core: `softmax(q @ kᵀ) @ v` over the last axis, read through the canonical rules.

`match_softmax` anchors on a softmax and returns what the attention computes (`Attention`: q, k, v,
scale, masks) and the node it replaces (the probabilities @ v), or raises NoMatch with the reason.
The scale, masks, casts and transposes around the core are attention_canonical.py's rules; here are
the checks that q, k and v line up, and grouped-query attention's K/V head repeats read without the
repeat. Nothing here touches the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from blade.ir.graph import Graph, Node
from blade.ir.shapes import is_static, same_shape, same_size
from blade.ops import info
from blade.ops.info import arg
from blade.passes.attention_canonical import (NoMatch, Peeled, k_of, operand_scale, probabilities_reader,
                                              scores_product)
from blade.passes.attention_sizes import SizeOnly
from blade.passes.rewrite import New

aten = torch.ops.aten


@dataclass
class Attention:
    """What one matched attention computes, in the op's terms (k may be a transpose still to be added)."""

    q: Node
    k: Node | New
    v: Node
    peeled: Peeled = field(default_factory=Peeled)  # scale and masks
    causal: bool = False
    groups: int = 1
    notes: list[str] = field(default_factory=list)


def match_softmax(graph: Graph, sizes: SizeOnly, softmax: Node) -> tuple[Attention, Node]:
    """The attention around `softmax` and the node it replaces (the probabilities @ v)."""
    rank = softmax.val.rank
    dim = arg(softmax, "dim")
    if (dim + rank if dim < 0 else dim) != rank - 1:
        raise NoMatch(f"softmax over dim {dim}, not the last (key) axis")
    probs, out = probabilities_reader(graph, softmax)
    if out.target not in info.BATCH_MATMULS or out.args[0] is not probs or out.args[1] is probs:
        raise NoMatch("its output is not multiplied by the values (no probs @ v)")
    peeled = Peeled()
    qk = scores_product(graph, sizes, softmax, peeled)
    q, kt, v = qk.args[0], qk.args[1], out.args[1]
    if not (isinstance(q, Node) and isinstance(kt, Node)):
        raise NoMatch("q @ kᵀ does not read two tensors")
    if q.val.rank != rank or kt.val.rank != rank or v.val.rank != rank or rank not in (3, 4):
        raise NoMatch(f"q, kᵀ, v of rank {q.val.rank}, {kt.val.rank}, {v.val.rank}: only rank 3 or 4")
    att = Attention(q=operand_scale(graph, sizes, q, peeled), k=k_of(graph, sizes, kt, peeled), v=v, peeled=peeled)
    if out.val.dtype != q.val.dtype:
        raise NoMatch(f"attention output is {out.val.dtype} but q is {q.val.dtype}")
    _check_shapes(att, softmax, out)
    return att, out


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
    if x.target is aten.repeat_interleave.self_int and arg(x, "dim") in (1, -3) \
            and arg(x, "output_size") in (None, x.val.shape[1]):
        groups = x.args[1]
        return (x.args[0], groups) if isinstance(groups, int) else None
    if x.target is aten.expand.default:
        src = x.args[0]
        if src.val.rank == 4 and src.val.shape[1] == 1 and is_static(x.val.shape[1]) \
                and same_shape((src.val.shape[0], *src.val.shape[2:]), (x.val.shape[0], *x.val.shape[2:])):
            return src, x.val.shape[1]
    node = x
    if node.target in info.RESHAPES:
        node = node.args[0]
        if node.target in info.CLONES:
            node = node.args[0]
        if node.target is aten.expand.default and node.val.rank == 5:
            src = node.args[0]
            if src.target is aten.unsqueeze.default and arg(src, "dim") in (2, -3):
                base = src.args[0]
                groups = node.val.shape[2]
                if is_static(groups) and same_shape(base.val.shape, (x.val.shape[0], node.val.shape[1],
                                                                     *x.val.shape[2:])):
                    return base, groups
    return None


def unrepeated_kv(graph: Graph, k: Node, v: Node) -> tuple[Node, Node, int] | None:
    """(k, v, groups) read through the same head repeat of both (grouped-query attention), else None."""
    k_found, v_found = strip_head_repeat(graph, k), strip_head_repeat(graph, v)
    if k_found and v_found and k_found[1] == v_found[1] and k_found[1] > 1:
        return k_found[0], v_found[0], k_found[1]
    return None


def strip_gqa(graph: Graph, att: Attention) -> None:
    """Read K/V through a head repeat (grouped-query attention), or note one K/V head (multi-query)."""
    found = unrepeated_kv(graph, att.k, att.v)
    if found:
        att.k, att.v, att.groups = found
    elif att.k.val.rank == 4 and is_static(att.k.val.shape[1]) and att.k.val.shape[1] == 1 \
            and not same_size(att.q.val.shape[1], 1):
        att.groups = att.q.val.shape[1]  # one K/V head broadcast by the matmul: multi-query
