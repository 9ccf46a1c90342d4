"""The op-info table: groups that must not overlap do not, arguments read by schema name, meta inferred as eager computes it."""
import pytest
import torch

from blade.ir.graph import Node, ScalarMeta, TensorMeta
from blade.ir.shapes import dim_symbol
from blade.ops import info
from blade.ops.info import arg, argument, infer_meta

aten = torch.ops.aten


def _input(name: str, shape, dtype=torch.float32) -> Node:
    return Node(name, "input", None, meta={"val": TensorMeta(tuple(shape), dtype)})


@pytest.mark.parametrize("groups", [
    ("ELEMENTWISE", "REDUCTIONS", "SOFTMAXES", "LOG_SOFTMAXES", "NORMS", "MATMULS", "CONVOLUTIONS", "ATTENTIONS",
     "REARRANGES", "SPLITS", "GATHERS", "FACTORIES", "CASTS", "CLONES", "SIZE_QUERIES", "ASSERTS"),
    ("BINARY_ARITHMETIC", "UNARY_MATH", "ACTIVATIONS", "COMPARISONS", "LOGICAL", "WHERES", "MASKED_FILLS"),
    ("VIEW_RESHAPES", "PERMUTES", "SQUEEZES"),
])
def test_groups_that_name_different_kinds_of_op_do_not_overlap(groups):
    seen: dict = {}
    for name in groups:
        for op in getattr(info, name):
            assert op not in seen, f"{op} is in both {seen.get(op)} and {name}"
            seen[op] = name


def test_groups_are_frozensets_of_op_overloads():
    groups = [v for k, v in vars(info).items() if k.isupper() and isinstance(v, frozenset)]
    assert len(groups) > 20
    for group in groups:
        assert all(isinstance(op, torch._ops.OpOverload) for op in group)


def test_wider_groups_hold_the_narrower_ones():
    assert info.VIEW_RESHAPES < info.RESHAPES < info.REARRANGES
    assert info.PERMUTES < info.REARRANGES and info.SQUEEZES < info.REARRANGES
    assert info.ACTIVATIONS < info.ELEMENTWISE and info.BINARY_ARITHMETIC < info.ELEMENTWISE
    assert info.BATCH_MATMULS < info.MATMULS
    assert info.TO_COPIES < info.COPIES and aten.contiguous.default not in info.COPIES


def test_arg_reads_by_position_by_keyword_and_falls_back_to_defaults():
    x = _input("x", (2, 8))
    by_position = Node("s", "call", aten.slice.Tensor, (x, 1, 0, 4, 2))
    by_keyword = Node("s", "call", aten.slice.Tensor, (x,), {"dim": 1, "end": 4})
    assert arg(by_position, "self") is x and arg(by_position, "step") == 2 and arg(by_position, "end") == 4
    assert arg(by_keyword, "dim") == 1 and arg(by_keyword, "end") == 4
    assert arg(by_keyword, "step") == 1  # the schema's default
    assert arg(by_keyword, "start") is None  # optional with no default given: None
    assert arg(by_keyword, "step", 3) == 3  # the caller's default wins over the schema's
    cast = Node("c", "call", aten._to_copy.default, (x,), {"dtype": torch.float16})
    assert arg(cast, "dtype") == torch.float16 and arg(cast, "non_blocking") is False
    assert argument(aten.softmax.int, (x, -1), {}, "dim") == -1


def test_arg_refuses_a_name_the_schema_does_not_have():
    node = Node("s", "call", aten.slice.Tensor, (_input("x", (2, 8)), 1))
    with pytest.raises(KeyError, match="no argument 'stride'"):
        arg(node, "stride")


def _eager(target, args, kwargs=None):
    tensors = [torch.randn(n.val.shape).to(n.val.dtype) if isinstance(n, Node) else n for n in args]
    return target(*tensors, **(kwargs or {}))


@pytest.mark.parametrize("target,shapes,literals,kwargs", [
    (aten.linear.default, [(3, 8), (5, 8), (5,)], [], {}),
    (aten.add.Tensor, [(3, 1, 8), (4, 8)], [], {}),
    (aten.view.default, [(3, 8)], [[4, 6]], {}),
    (aten.permute.default, [(2, 3, 4)], [[2, 0, 1]], {}),
    (aten._to_copy.default, [(3, 8)], [], {"dtype": torch.bfloat16}),
    (aten.amax.default, [(3, 8)], [[-1], True], {}),
    (aten.bmm.default, [(2, 3, 4), (2, 4, 5)], [], {}),
])
def test_infer_meta_matches_eager_shapes_and_dtypes(target, shapes, literals, kwargs):
    args = tuple(_input(f"x{i}", shape) for i, shape in enumerate(shapes)) + tuple(literals)
    meta = infer_meta(target, args, kwargs)
    out = _eager(target, args, kwargs)
    assert meta == TensorMeta(tuple(out.shape), out.dtype, "cpu")


def test_infer_meta_gives_several_outputs_as_a_tuple():
    x = _input("x", (4, 6))
    metas = infer_meta(aten.var_mean.correction, (x, [1]), {"keepdim": True})
    assert metas == (TensorMeta((4, 1), torch.float32), TensorMeta((4, 1), torch.float32))


def test_infer_meta_keeps_symbolic_dims_and_the_device():
    batch, seq = dim_symbol("batch"), dim_symbol("seq")
    x = Node("x", "input", None, meta={"val": TensorMeta((batch, seq, 8), torch.float16, "cuda")})
    assert infer_meta(aten.view.default, (x, [batch * seq, 8])) == TensorMeta((batch * seq, 8), torch.float16, "cuda")
    assert infer_meta(aten.sum.dim_IntList, (x, [1])) == TensorMeta((batch, 8), torch.float16, "cuda")
    size = Node("n", "call", aten.sym_size.int, (x, 1), meta={"val": ScalarMeta(int, seq)})
    assert infer_meta(aten.sym_size.int, (x, 1)) == ScalarMeta(int, seq)
    assert infer_meta(aten.arange.default, (size,), {"dtype": torch.int64, "device": "cpu"}) == \
        TensorMeta((seq,), torch.int64, "cpu")


def test_infer_meta_remembers_answers_by_value_and_type():
    x = _input("x", (3,), torch.int64)
    assert infer_meta(aten.add.Tensor, (x, 1)).dtype == torch.int64
    assert infer_meta(aten.add.Tensor, (x, 1.0)).dtype == torch.float32  # not the answer for 1
    assert infer_meta(aten.add.Tensor, (x, True)).dtype == torch.int64
