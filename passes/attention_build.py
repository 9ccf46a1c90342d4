"""Building the replacement: the plan that puts one blade::flash_attention where the attention was.

`attention_plan` turns a matched `Attention` into a rewrite plan (passes/rewrite.py): the masks
combined into the one mask the op takes, operands raised to rank 4, the op, and the reroute of the
replaced node's readers; `sdpa_plan` does the same for an `aten.scaled_dot_product_attention` call.
Each new node's meta comes from its op's meta function. After a plan commits, `absorb_output_copy`
and `views_to_reshapes` adapt the ops downstream to the op's output layout.
"""
from __future__ import annotations

import math

import torch

from blade.ir.graph import Graph, Node
from blade.ir.shapes import is_static
from blade.ops import info
from blade.ops.attention import FLASH_ATTENTION
from blade.ops.info import arg
from blade.passes.attention_canonical import NoMatch, Peeled, ScaledMask
from blade.passes.attention_match import Attention, unrepeated_kv
from blade.passes.manager import PassContext
from blade.passes.rewrite import New, Plan

aten = torch.ops.aten


def combined_mask(peeled: Peeled) -> New | Node | None:
    """One mask for the op: bool when only bool masks remain, else an additive float mask."""
    allowed = list(peeled.allowed) + [New(aten.logical_not.default, (m,), name="allowed") for m in peeled.disallowed]
    combined = None
    for mask in allowed:
        combined = mask if combined is None else New(aten.logical_and.default, (combined, mask), name="allowed")
    additive = None
    for mask in peeled.additive:
        node, factor = (mask.mask, mask.factor) if isinstance(mask, ScaledMask) else (mask, 1.0)
        if factor != 1.0:
            node = New(aten.mul.Tensor, (node, factor), name="mask_scaled")
        additive = node if additive is None else New(aten.add.Tensor, (additive, node), name="mask")
    if additive is None:
        return combined
    if combined is not None:
        disallowed = New(aten.logical_not.default, (combined,), name="disallowed")
        additive = New(aten.masked_fill.Scalar, (additive, disallowed, float("-inf")), name="mask")
    return additive


def to_4d(x):
    """x with leading size-1 axes up to rank 4 (how it broadcasts against [B, H, Sq, Sk] anyway)."""
    while x is not None and x.val.rank < 4:
        x = New(aten.unsqueeze.default, (x, 0), name=f"{x.name}_4d")
    return x


def attention_plan(att: Attention, softmax: Node, out: Node) -> tuple[Plan, New]:
    """The plan that replaces `out` by blade::flash_attention for `att`, and the op's New."""
    q, k, v, mask = (to_4d(x) for x in (att.q, att.k, att.v, combined_mask(att.peeled)))
    flash = New(FLASH_ATTENTION, (q, k, v, mask, att.peeled.scale, att.causal), name="flash_attention")
    result = New(aten.squeeze.dim, (flash, 0), name="attention") if att.q.val.rank == 3 else flash
    return Plan(softmax.name, reroute=[(out, result)]), flash


def sdpa_plan(graph: Graph, node: Node) -> tuple[Plan, New]:
    """The plan that replaces an SDPA call by blade::flash_attention (raises NoMatch where the op differs). K/V heads
    repeated for grouped-query attention (Hugging Face's repeat_kv) are read without the repeat: the op reads a
    query head's K/V head in place, where the repeat copies the whole cache every decode step."""
    q, k, v = node.args[:3]
    unrepeated = unrepeated_kv(graph, k, v)
    if unrepeated:
        k, v = unrepeated[:2]
    mask, dropout = arg(node, "attn_mask"), arg(node, "dropout_p")
    causal, scale = bool(arg(node, "is_causal")), arg(node, "scale")
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
    flash = New(FLASH_ATTENTION, (q, k, v, to_4d(mask), float(scale), causal), name="flash_attention")
    return Plan(node.name, reroute=[(node, flash)]), flash


def absorb_output_copy(graph: Graph, flash: Node, ctx: PassContext) -> None:
    """Drop the copy in `clone(flash.transpose(1, 2))`: the op's output memory is [B, Sq, Hq, Dv]
    already, so the transpose back to the model's layout is dense without it."""
    for transposed in graph.users(flash):
        if transposed.target is not aten.transpose.int or {d % 4 for d in transposed.args[1:3]} != {1, 2}:
            continue
        for copy in graph.users(transposed):
            memory_format = copy.kwargs.get("memory_format", torch.contiguous_format)
            if copy.target in info.CLONES and memory_format in (torch.contiguous_format, None) \
                    and not graph.is_output(copy):
                graph.replace_all_uses(copy, transposed)
                ctx.count("output_copies_absorbed")


def views_to_reshapes(graph: Graph, ctx: PassContext) -> None:
    """Let every `view` downstream of an attention op copy when it must.

    torch.export recorded `view` wherever the captured strides allowed one: after a matmul's dense
    output, or after SDPA, whose output strides follow its inputs and its kernel. The op's output is
    laid out [B, Sq, Hq, Dv], and elementwise ops pass a layout on, so a later view may not be
    possible; `reshape` is the same view where it is, a copy where it is not.
    """
    flash = [n for n in graph.call_nodes if n.target is FLASH_ATTENTION]
    downstream = graph.downstream(flash)
    for node in downstream:
        if node.target in info.VIEW_RESHAPES:
            node.target = aten.reshape.default
            ctx.count("views_made_reshapes")
