"""Rewrite rules (onnxscript's rewriter) that clean up what exporting fused ops leaves behind."""
from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase
from onnxscript.rewriter.rules import common as rules


def _same_known_shape(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    """Equal shapes whose every dim is known: a number, or a named symbolic dim."""
    if a is None or b is None or len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, ir.SymbolicDim) and x.value is None:
            return False
        if x != y:
            return False
    return True


class ReshapeToSameShape(RewriteRuleClassBase):
    """Reshape(x, s) whose result has x's shape → x."""

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape)

    def check(self, context, x, shape) -> MatchResult:
        result = MatchResult()
        if not _same_known_shape(x.shape, context.output_values[0].shape):
            return result.fail("the reshape changes the shape (or a dim is unknown)")
        return result

    def rewrite(self, op, x, shape):
        return op.Identity(x)


class ReshapeReshapeBack(RewriteRuleClassBase):
    """Reshape(Reshape(x, a), b) whose result has x's shape → x (split heads, then merge them)."""

    def pattern(self, op, x, first, second):
        return op.Reshape(op.Reshape(x, first), second)

    def check(self, context, x, first, second) -> MatchResult:
        result = MatchResult()
        if not _same_known_shape(x.shape, context.output_values[0].shape):
            return result.fail("the reshapes do not restore x's shape (or a dim is unknown)")
        return result

    def rewrite(self, op, x, first, second):
        return op.Identity(x)


# Applied to every exported region: a transpose and its inverse around a fused op, reshapes that
# split and merge heads back, no-op casts/expands.
SIMPLIFY_RULES = [rules.transpose_transpose_rule, rules.no_op_transpose_rule, ReshapeReshapeBack.rule(),
                  ReshapeToSameShape.rule(), rules.reshape_reshape_rule, rules.no_op_cast_rule,
                  rules.no_op_expand_rule, rules.cast_cast_rule]
