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

In parts: attention_canonical.py (the rules that read through scales, masks, casts, transposes and
no-op copies), attention_match.py (the core and its shape checks, grouped-query heads),
attention_causal.py (proving a size-only mask causal), attention_sizes.py (evaluating what depends
on sizes alone), attention_build.py (the replacement as a rewrite plan). Every match is made without
touching the graph; only a plan the pass commits does.
"""
from __future__ import annotations

import torch

from blade.ir.graph import Graph, Node
from blade.ops import info
from blade.passes.attention_build import absorb_output_copy, attention_plan, sdpa_plan, views_to_reshapes
from blade.passes.attention_canonical import NoMatch
from blade.passes.attention_causal import find_causal
from blade.passes.attention_match import Attention, match_softmax, strip_gqa
from blade.passes.attention_sizes import SizeOnly
from blade.passes.cleanup import eliminate_dead_code
from blade.passes.manager import PassContext
from blade.passes.rewrite import New, Plan

aten = torch.ops.aten
HELD_BACK = "held back by the accuracy bisection"


def describe(att: Attention, softmax: Node) -> str:
    parts = [f"scale={att.peeled.scale:.6g}"]
    if att.causal:
        parts.append("causal")
    if att.groups > 1:
        parts.append(f"gqa groups={att.groups}")
    masks = len(att.peeled.additive) + len(att.peeled.allowed) + len(att.peeled.disallowed)
    if masks:
        parts.append(f"{masks} mask{'s' if masks > 1 else ''}")
    return "; ".join([f"softmax {softmax.name} -> flash_attention ({', '.join(parts)})", *att.notes])


def softmax_plan(graph: Graph, sizes: SizeOnly, softmax: Node) -> tuple[Plan, New]:
    """The plan that replaces the attention around `softmax` (raises NoMatch)."""
    att, out = match_softmax(graph, sizes, softmax)
    strip_gqa(graph, att)
    find_causal(sizes, att, att.q.val.shape[-2], att.k.val.shape[-2])
    masks = att.peeled.allowed + att.peeled.disallowed
    left = [m.name for m in att.peeled.finite_fills if any(m is x for x in masks)]
    if left:
        raise NoMatch(f"masks {left} fill with a finite value and are not causal: a row with every key masked "
                      "would average the values in eager and give zeros in the op")
    plan, flash = attention_plan(att, softmax, out)
    plan.description = describe(att, softmax)
    return plan, flash


def _describe_sdpa(sdpa: Node, flash: New) -> str:
    groups = sdpa.args[0].val.shape[1] // flash.args[1].val.shape[1] if sdpa.args[0].val.rank == 4 else 1
    notes = (", causal" if flash.args[5] else "") + (f", gqa groups={groups}" if flash.args[1] is not sdpa.args[1] else "")
    return f"{sdpa.name} -> flash_attention (scale={flash.args[4]:.6g}{notes})"


def _plan(graph: Graph, sizes: SizeOnly, node: Node) -> tuple[Plan, New]:
    if node.target is aten.scaled_dot_product_attention.default:
        plan, flash = sdpa_plan(graph, node)
        plan.description = _describe_sdpa(node, flash)
        return plan, flash
    return softmax_plan(graph, sizes, node)


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Replace every attention the pass can match; note each one it leaves, with the reason."""
    sizes = SizeOnly(graph)
    for node in graph.call_nodes:
        sdpa = node.target is aten.scaled_dot_product_attention.default
        if not sdpa and node.target not in info.SOFTMAXES:
            continue
        try:
            plan, flash = _plan(graph, sizes, node)
            if not ctx.allows(plan.site):
                raise NoMatch(HELD_BACK)
        except NoMatch as miss:
            ctx.count("sdpa_left" if sdpa else "softmax_left")
            ctx.note(f"left {node.name}: {miss}")
            continue
        made = plan.commit(graph)
        if not sdpa:
            absorb_output_copy(graph, made[flash], ctx)
        ctx.note(plan.description)
        ctx.count("attention_replaced")
    eliminate_dead_code(graph, ctx)  # the ops the committed plans replaced
    views_to_reshapes(graph, ctx)
    return graph
