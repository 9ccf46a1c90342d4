"""The causal proof: a mask computed from sizes alone that is exactly `tril`, so the op runs causal=True.

A candidate mask (boolean allowed/disallowed, or additive 0/-inf) must be built from sizes used only
as extents (EXTENT_ARGS), and equal the causal pattern at two small sample sizes and at the largest
size its dims may take (attention_sizes.SizeOnly). Nothing here touches the graph.
"""
from __future__ import annotations

import torch

from blade.ir.graph import Graph, Node, ScalarMeta, iter_refs
from blade.ir.shapes import evaluate, is_static, same_size
from blade.passes.attention_canonical import MASK_OUT, ScaledMask
from blade.passes.attention_sizes import CAUSAL_CHECK_MAX, SIZE_ONLY_MAX_NODES, SizeOnly, ancestors

aten = torch.ops.aten

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
    nodes = ancestors(graph, mask, SIZE_ONLY_MAX_NODES) or set()
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


def find_causal(sizes: SizeOnly, att, q_len, k_len) -> None:
    """Drop the one mask that is exactly causal from `att` (an Attention) and set att.causal instead."""
    if not _checkable(sizes.graph, q_len):
        if any(sizes.values(m.mask if isinstance(m, ScaledMask) else m) is not None
               for m in att.peeled.allowed + att.peeled.disallowed + att.peeled.additive):
            att.notes.append(f"its size-only mask stays explicit: seq {q_len} may exceed {CAUSAL_CHECK_MAX}, the "
                             "largest size blade checks a causal pattern at (declare a max on the Dim)")
        return
    for masks, kind in ((att.peeled.allowed, "allowed"), (att.peeled.disallowed, "disallowed"),
                        (att.peeled.additive, "additive")):
        for mask in list(masks):
            plain = mask.mask if isinstance(mask, ScaledMask) else mask
            if _causal_kind(sizes, plain, q_len, k_len) == kind:
                masks.remove(mask)
                att.causal = True
                return
