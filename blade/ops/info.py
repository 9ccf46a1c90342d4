"""The op-info table: op groups, argument access by schema name, and output meta from an op's meta function.

Every floor above reads op knowledge here instead of keeping its own sets. The groups (frozensets of
OpOverloads, blade's own ops included):

- dtype and memory: CASTS (dtype conversions), TO_COPIES (the `.to` family), CLONES (clone, contiguous),
  COPIES (ops that return new memory holding the same values: clones and `.to` conversions)
- shape: VIEW_RESHAPES (view, _unsafe_view: never copy), RESHAPES (those and reshape), PERMUTES,
  SQUEEZES, SPLITS, REARRANGES (ops that only rearrange their first argument's elements)
- elementwise: BINARY_ARITHMETIC, UNARY_MATH, ACTIVATIONS, COMPARISONS, LOGICAL, WHERES, MASKED_FILLS,
  ELEMENTWISE (all of them, plus pow, clamp, maximum, minimum)
- reductions and rows: SOFTMAXES, LOG_SOFTMAXES, REDUCTIONS (sum, mean, amax, amin, var), NORMS, POOLS,
  EMBEDDING_BAGS
- data: GATHERS (lookups that read only the rows they return), FACTORIES (tensors made from sizes)
- compute: MATMULS, BATCH_MATMULS (matmul, bmm: attention's QKᵀ and PV), CONVOLUTIONS, ATTENTIONS, QUANTIZED
- bookkeeping: SIZE_QUERIES (sym_size, sym_numel), ASSERTS

`arg(node, name)` reads an argument by its schema name, given by position or keyword, else its default;
`is_view`, `is_impure` and `is_random` read an op's schema and tags; `infer_meta(target, args, kwargs)` runs
the op's meta function (on meta tensors, or fake ones where a dim is symbolic) and returns the output's
TensorMeta (a tuple of them for several outputs), symbolic dims included. Dtype names are the IR's
(`blade.ir.graph.dtype_name`: fp32, bf16, int8, …).

What the old per-module sets are here: CAST_OPS, CASTS → CASTS; attention's COPY_OPS → CLONES; cleanup's
COPY_OPS → COPIES; RESHAPE_OPS, RESHAPES → RESHAPES; VIEW_OPS, STRIDE_BOUND_VIEWS → VIEW_RESHAPES;
SOFTMAX_OPS → SOFTMAXES; MATMUL_OPS → BATCH_MATMULS; WHERE_OPS → WHERES; precision's SHAPE_ONLY_OPS →
REARRANGES; `_arg(node, index, name)` → `arg(node, name)`; cleanup's `is_view_op` → `is_view`.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import threading

import sympy
import torch

from blade.ir.graph import Node, ScalarMeta, TensorMeta, iter_refs, map_refs
from blade.ir.shapes import as_size
from blade.ops.attention import FLASH_ATTENTION
from blade.ops.quantized import Q4LINEAR, QEMBEDDING, QLINEAR

aten = torch.ops.aten
prims = torch.ops.prims

# -- dtype and memory ----------------------------------------------------------------------------------
CASTS = frozenset({aten._to_copy.default, aten.to.dtype, prims.convert_element_type.default})
TO_COPIES = frozenset({aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device})
# contiguous returns its input itself when it already is contiguous, so it is a clone but not a COPY
CLONES = frozenset({aten.clone.default, aten.contiguous.default})
COPIES = TO_COPIES | {aten.clone.default, aten.lift_fresh_copy.default}

# -- shape -----------------------------------------------------------------------------------------------
VIEW_RESHAPES = frozenset({aten.view.default, aten._unsafe_view.default})
RESHAPES = VIEW_RESHAPES | {aten.reshape.default}
PERMUTES = frozenset({aten.permute.default, aten.transpose.int, aten.t.default})
SQUEEZES = frozenset({aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default})
SPLITS = frozenset({aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default})
REARRANGES = RESHAPES | PERMUTES | SQUEEZES | {aten.expand.default, aten.alias.default}

# -- elementwise -----------------------------------------------------------------------------------------
BINARY_ARITHMETIC = frozenset({
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
})
UNARY_MATH = frozenset({
    aten.neg.default, aten.sqrt.default, aten.rsqrt.default, aten.exp.default, aten.log.default, aten.sin.default,
    aten.cos.default, aten.abs.default, aten.erf.default,
})
ACTIVATIONS = frozenset({
    aten.tanh.default, aten.sigmoid.default, aten.relu.default, aten.gelu.default, aten.silu.default,
    aten.hardtanh.default, aten.leaky_relu.default,
})
COMPARISONS = frozenset({
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Scalar, aten.lt.Tensor, aten.le.Tensor, aten.gt.Tensor, aten.ge.Tensor,
    aten.lt.Scalar, aten.gt.Scalar,
})
LOGICAL = frozenset({aten.logical_not.default, aten.logical_and.default, aten.logical_or.default,
                     aten.bitwise_not.default, aten.bitwise_and.Tensor})
WHERES = frozenset({aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar})
MASKED_FILLS = frozenset({aten.masked_fill.Scalar, aten.masked_fill.Tensor})
ELEMENTWISE = BINARY_ARITHMETIC | UNARY_MATH | ACTIVATIONS | COMPARISONS | LOGICAL | WHERES | MASKED_FILLS | {
    aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.clamp.default, aten.maximum.default, aten.minimum.default}

# -- reductions and rows ---------------------------------------------------------------------------------
SOFTMAXES = frozenset({aten.softmax.int, aten._softmax.default, aten._safe_softmax.default})
LOG_SOFTMAXES = frozenset({aten.log_softmax.int, aten._log_softmax.default})
REDUCTIONS = frozenset({
    aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.amax.default, aten.amin.default,
    aten.var_mean.correction, aten.var.correction, aten.var.dim,
})
NORMS = frozenset({aten.layer_norm.default, aten.native_layer_norm.default, aten.group_norm.default,
                   aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default})
POOLS = frozenset({aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default, aten.max_pool2d.default})
EMBEDDING_BAGS = frozenset({aten.embedding_bag.padding_idx, aten.embedding_bag.default})

# -- data ------------------------------------------------------------------------------------------------
GATHERS = frozenset({aten.embedding.default, aten.index_select.default, aten.gather.default, aten.index.Tensor})
# a functional write -> the op that does it in the tensor it writes (both return the written tensor)
IN_PLACE_WRITES = {aten.index_put.default: aten.index_put_.default, aten.index_copy.default: aten.index_copy_.default}
FACTORIES = frozenset({
    aten.ones.default, aten.zeros.default, aten.full.default, aten.arange.default, aten.arange.start_step,
    aten.ones_like.default, aten.zeros_like.default, aten.full_like.default,
})

# -- compute ---------------------------------------------------------------------------------------------
MATMULS = frozenset({aten.linear.default, aten.addmm.default, aten.baddbmm.default, aten.mm.default,
                     aten.bmm.default, aten.matmul.default})
BATCH_MATMULS = frozenset({aten.matmul.default, aten.bmm.default})
# the .padding overloads take padding="same"/"valid" (HF EfficientNet's depthwise convolutions)
CONVOLUTIONS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
                          aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding})
ATTENTIONS = frozenset({FLASH_ATTENTION, aten.scaled_dot_product_attention.default})
QUANTIZED = frozenset({QLINEAR, Q4LINEAR, QEMBEDDING})

# -- bookkeeping -----------------------------------------------------------------------------------------
SIZE_QUERIES = frozenset({aten.sym_size.int, aten.sym_numel.default})
ASSERTS = frozenset({aten._assert_tensor_metadata.default, aten._assert_scalar.default,
                     aten.sym_constrain_range_for_size.default})


# -- arguments by schema name ----------------------------------------------------------------------------

_NO_DEFAULT = object()


@functools.lru_cache(maxsize=None)
def _parameters(target) -> dict[str, tuple[int | None, object]]:
    """name -> (position, or None when keyword-only; the schema's default, or _NO_DEFAULT)."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        raise TypeError(f"{target} has no schema to read arguments by name from")
    return {a.name: (None if a.kwarg_only else i, a.default_value if a.has_default_value() else _NO_DEFAULT)
            for i, a in enumerate(schema.arguments)}


def argument(target, args: tuple, kwargs: dict, name: str, default=_NO_DEFAULT):
    """The argument `name` of a call of `target` (an OpOverload): given by position or by keyword, else
    `default` when one is passed, else the schema's default (None when it has none).
    A name the schema does not have is a KeyError: a misspelt name is a bug, not an absent argument."""
    parameters = _parameters(target)
    if name not in parameters:
        raise KeyError(f"{target} has no argument {name!r} (it has {', '.join(parameters)})")
    position, schema_default = parameters[name]
    if position is not None and position < len(args):
        return args[position]
    if name in kwargs:
        return kwargs[name]
    if default is not _NO_DEFAULT:
        return default
    return None if schema_default is _NO_DEFAULT else schema_default


def arg(node: Node, name: str, default=_NO_DEFAULT):
    """The argument `name` of a call node, by its target's schema (see `argument`)."""
    return argument(node.target, node.args, node.kwargs, name, default)


# -- what an op's schema and tags say -------------------------------------------------------------------

def is_view(target) -> bool:
    """An op whose result shares memory with its first argument (schema `Tensor(a) -> Tensor(a)`)."""
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def is_impure(target) -> bool:
    """An op with side effects (torch.fx's list) or one that mutates an argument."""
    if target in getattr(torch.fx.node, "_side_effectful_functions", set()):
        return True
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def is_random(target) -> bool:
    """An op that draws from the random generator: two calls differ."""
    return torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())


# -- output meta from the op's meta function -------------------------------------------------------------

class _Space:
    """Stand-ins for TensorMetas that the op's meta function runs on, and the metas of what it returns."""

    device = "cpu"  # where the stand-ins are made

    def context(self):
        return contextlib.nullcontext()

    def size(self, size):
        return size

    def unsize(self, size):
        return int(size)

    def tensor(self, meta: TensorMeta) -> torch.Tensor:
        with self.context():
            return torch.empty(tuple(self.size(s) for s in meta.shape), dtype=meta.dtype, device=self.device)

    def value(self, val):
        """A node's value as the op sees it: a tensor, a (symbolic) int, or a nest of them."""
        if isinstance(val, TensorMeta):
            return self.tensor(val)
        if isinstance(val, ScalarMeta):
            if val.value is None:
                raise ValueError("a scalar whose value is unknown")
            return self.size(val.value)
        if isinstance(val, (tuple, list)):
            return type(val)(self.value(v) for v in val)
        raise ValueError(f"a value of no known meta ({val!r})")

    def literal(self, value):
        """Sizes written into the arguments (a view's shape [b, 4]) as the op takes them."""
        if isinstance(value, sympy.Expr):
            return self.size(value)
        if isinstance(value, (tuple, list)):
            return type(value)(self.literal(v) for v in value)
        if isinstance(value, dict):
            return {k: self.literal(v) for k, v in value.items()}
        return value

    def back(self, out, device: str):
        """The meta of what the op returned, on `device`."""
        if isinstance(out, torch.Tensor):
            return TensorMeta(tuple(self.unsize(s) for s in out.shape), out.dtype, device)
        if isinstance(out, (tuple, list)):
            return tuple(self.back(o, device) for o in out)
        if isinstance(out, (torch.SymInt, int)) and not isinstance(out, bool):
            return ScalarMeta(int, self.unsize(out))
        if isinstance(out, (float, bool)):
            return ScalarMeta(type(out), out)
        raise ValueError(f"an output of no known meta ({out!r})")


class _MetaSpace(_Space):
    """Static shapes: tensors on the meta device (microseconds an op)."""

    device = "meta"


class _FakeSpace(_Space):
    """Symbolic shapes: fake tensors whose dims are one ShapeEnv's symbols, one for each of blade's, and back."""

    def __init__(self):
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        self.env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.env)
        self.to_env: dict[sympy.Symbol, sympy.Symbol] = {}
        self.from_env: dict[sympy.Symbol, sympy.Symbol] = {}
        self.hints: dict[sympy.Symbol, int] = {}
        self.next_hints = itertools.count(1009, 2)  # odd, distinct, large: no meta function takes one for 0 or 1

    def context(self):
        return self.mode

    def size(self, size):
        if not isinstance(size, sympy.Expr):
            return size
        if size.is_Integer:
            return int(size)
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic

        for symbol in sorted(size.free_symbols, key=str):
            if symbol not in self.to_env:
                hint = next(self.next_hints)
                ours = self.env.create_symbol(hint, source=ConstantSource(f"blade_{symbol}"),
                                              dynamic_dim=DimDynamic.DYNAMIC)
                self.to_env[symbol], self.from_env[ours], self.hints[symbol] = ours, symbol, hint
        return self.env.create_symintnode(size.xreplace(self.to_env), hint=int(size.xreplace(self.hints)))

    def unsize(self, size):
        if isinstance(size, torch.SymInt):
            return as_size(size.node.expr.xreplace(self.from_env))
        return int(size)


_META_SPACE = _MetaSpace()
_FAKE_SPACES = threading.local()
_FAKE_SPACE_USES = 4096  # calls one fake space serves (its caches make repeats cheaper) before a fresh one


def _fake_space() -> _FakeSpace:
    """This thread's fake space, renewed now and then so that the guards its ShapeEnv records stay few."""
    uses = getattr(_FAKE_SPACES, "uses", _FAKE_SPACE_USES)
    if uses >= _FAKE_SPACE_USES:
        _FAKE_SPACES.space, uses = _FakeSpace(), 0
    _FAKE_SPACES.uses = uses + 1
    return _FAKE_SPACES.space


def _symbolic(value) -> bool:
    """Whether a nest of arguments (Nodes read through their meta) holds a symbolic size."""
    if isinstance(value, Node):
        return _symbolic(value.val)
    if isinstance(value, TensorMeta):
        return _symbolic(value.shape)
    if isinstance(value, ScalarMeta):
        return _symbolic(value.value)
    if isinstance(value, sympy.Expr):
        return not value.is_Integer
    if isinstance(value, (tuple, list)):
        return any(_symbolic(v) for v in value)
    if isinstance(value, dict):
        return any(_symbolic(v) for v in value.values())
    return False


def _device_of(args, kwargs) -> str:
    device = kwargs.get("device")
    if device is not None:
        return torch.device(device).type
    tensors = (ref.val for ref in iter_refs((args, kwargs)) if isinstance(ref.val, TensorMeta))
    return next(tensors, TensorMeta((), torch.float32)).device


def infer_meta(target, args: tuple, kwargs: dict | None = None):
    """The meta of `target(*args, **kwargs)`, where args hold Nodes (read through their meta) and literals:
    the op's meta function run on meta-device tensors, or, where a size is symbolic, on fake tensors whose
    dims are symbols of their own, so that `view(x, [b * 4])` of x: [b, 4] infers [4*b]. The result is on the
    device of the first tensor argument (or of the `device` keyword). A TensorMeta, a ScalarMeta, or a tuple.
    Answers are remembered by the op and its arguments' metas: the layers of a model ask the same questions."""
    kwargs = dict(kwargs or {})
    try:
        key = (target, _signature(args), _signature(kwargs))
        hash(key)
    except TypeError:  # an argument that cannot be a key (a nested graph, an unhashable literal)
        return _infer(target, args, kwargs)
    answer = _ANSWERS.get(key)
    if answer is None:
        if len(_ANSWERS) >= _MAX_ANSWERS:
            _ANSWERS.clear()
        answer = _ANSWERS[key] = _infer(target, args, kwargs)
    return answer


_ANSWERS: dict = {}
_MAX_ANSWERS = 1 << 14


def _signature(value):
    """A nest of arguments as a key: Nodes by their meta, literals by type and value (1, 1.0 and True differ)."""
    if isinstance(value, Node):
        return ("node", value.val)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, _signature(v)) for k, v in sorted(value.items())))
    return (type(value), value)


def _infer(target, args: tuple, kwargs: dict):
    space = _fake_space() if _symbolic((args, kwargs)) else _META_SPACE
    device = _device_of(args, kwargs)
    if "device" in kwargs:
        kwargs["device"] = space.device
    stand_ins = space.literal(map_refs((tuple(args), kwargs), lambda ref: space.value(ref.val)))
    with space.context():
        out = target(*stand_ins[0], **stand_ins[1])
    return space.back(out, device)
