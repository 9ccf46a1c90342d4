"""The eager backend's fast calls: each torch function in FAST_CALLS gives what its aten OpOverload gives (values,
shape, strides, dtype, whether it aliases its input), and the eager module calls them for those ops."""
from __future__ import annotations

import pytest
import torch

from blade.backends.eager.fast_calls import FAST_CALLS

aten = torch.ops.aten


def samples():
    """(op, args, kwargs) for every op of the table, fresh random tensors each time."""
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    w, b = torch.randn(4), torch.randn(4)
    m, n = torch.randn(3, 5), torch.randn(5, 2)
    return [
        (aten.reshape.default, (x, [6, -1]), {}), (aten.view.default, (x, [3, 8]), {}),
        (aten.transpose.int, (x, 1, 2), {}), (aten.permute.default, (x, [2, 0, 1]), {}),
        (aten.unsqueeze.default, (x, 1), {}), (aten.squeeze.dim, (x[:, :1], 1), {}),
        (aten.select.int, (x, 1, 2), {}), (aten.split.Tensor, (x, 2, 2), {}),
        (aten.add.Tensor, (x, y), {"alpha": 2}), (aten.add.Tensor, (x, 3), {}), (aten.sub.Tensor, (x, y), {}),
        (aten.mul.Tensor, (x, y), {}), (aten.mul.Tensor, (x, 0.5), {}), (aten.div.Tensor, (x, y), {}),
        (aten.neg.default, (x,), {}), (aten.clone.default, (x.transpose(0, 2),), {}),
        (aten.clone.default, (x,), {"memory_format": torch.contiguous_format}), (aten.cat.default, ([x, y], 1), {}),
        (aten.layer_norm.default, (x, [4], w, b, 1e-5, False), {}),
        (aten.embedding.default, (m, torch.tensor([[0, 2], [1, 1]])), {}),
        (aten.index_copy_.default, (x.clone(), 2, torch.tensor([0, 3]), torch.randn(2, 3, 2)), {}),
        (aten.softmax.int, (x, -1), {}), (aten.softmax.int, (x, -1, torch.float64), {}),
        (aten.relu.default, (x,), {}), (aten.tanh.default, (x,), {}), (aten.sigmoid.default, (x,), {}),
        (aten.rsqrt.default, (x.abs() + 1,), {}), (aten.mean.dim, (x, [1, 2], True), {}),
        (aten.bmm.default, (x, y.transpose(1, 2)), {}), (aten.mm.default, (m, n), {}),
        (aten.addmm.default, (torch.randn(2), m, n), {"beta": 0.5}), (aten.matmul.default, (x, torch.randn(4, 2)), {}),
        (aten.pow.Tensor_Scalar, (x, 2), {}), (aten.split_with_sizes.default, (x, [1, 3], -1), {}),
        (aten.expand.default, (x[:, :1], [2, 5, 4]), {}), (aten.silu.default, (x,), {}),
        (aten.gelu.default, (x,), {}), (aten.gelu.default, (x,), {"approximate": "tanh"}),
    ]


def clone_args(args):
    return tuple([a.clone() if isinstance(a, torch.Tensor) else a for a in v] if isinstance(v, list)
                 else (v.clone() if isinstance(v, torch.Tensor) else v) for v in args)


def leaves(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def test_every_op_of_the_table_has_a_sample():
    assert {op for op, _, _ in samples()} == set(FAST_CALLS)


@pytest.mark.parametrize("index", range(len(samples())))
def test_the_fast_call_gives_what_the_op_gives(index):
    op, args, kwargs = samples()[index]
    mine, theirs = clone_args(args), clone_args(args)
    got, want = leaves(FAST_CALLS[op](*mine, **kwargs)), leaves(op(*theirs, **kwargs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride(), op
        assert torch.equal(g, w), op
        # a view of the first argument in one is a view in the other (in-place ops return it)
        first_mine, first_theirs = mine[0][0] if isinstance(mine[0], list) else mine[0], \
            theirs[0][0] if isinstance(theirs[0], list) else theirs[0]
        assert (g.untyped_storage().data_ptr() == first_mine.untyped_storage().data_ptr()) == \
            (w.untyped_storage().data_ptr() == first_theirs.untyped_storage().data_ptr()), op
    for a, b in zip(mine, theirs):  # what an in-place op wrote
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), op


def test_the_eager_module_calls_them_and_matches_eager():
    import blade

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            h = self.norm(x).reshape(x.shape[0], -1, 4, 4).transpose(1, 2)
            return self.proj(h.reshape(x.shape) + x) * 0.5

    model = Block().eval()
    compiled = blade.compile(model, (torch.randn(2, 3, 16),), backend="eager", cache=False, passes=[])
    called = {n.target for n in compiled.executable.module.graph.nodes if n.op == "call_function"}
    assert FAST_CALLS[aten.layer_norm.default] in called and FAST_CALLS[aten.transpose.int] in called
    assert not {t for t in called if isinstance(t, torch._ops.OpOverload) and t in FAST_CALLS}
    fresh = torch.randn(2, 3, 16)
    want = model(fresh)
    err = ((compiled(fresh) - want).norm() / want.norm()).item()
    assert err < 1e-6, err
