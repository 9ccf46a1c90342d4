"""The eager backend runs a write into a mutated buffer in that buffer's memory only when nothing reads the old
value; either way the results and the buffer equal eager PyTorch's."""
from __future__ import annotations

import torch

import blade
from blade.backends.eager.inplace import in_place_writes


class Cache(torch.nn.Module):
    def __init__(self, read_old_first: bool):
        super().__init__()
        self.read_old_first = read_old_first
        self.register_buffer("cache", torch.zeros(4, 8, 3))

    def forward(self, rows, positions, values):
        before = self.cache.sum() if self.read_old_first else 0
        self.cache.index_put_((rows[:, None], positions), values)
        return self.cache[rows].sum((1, 2)) + before


def run(read_old_first: bool):
    example = (torch.tensor([0, 2]), torch.tensor([[0, 1], [0, 1]]), torch.randn(2, 2, 3))
    model = Cache(read_old_first)
    compiled = blade.compile(Cache(read_old_first), example, backend="eager", cache=False)
    compiled.graph.state["b_cache"].zero_()  # the compile's accuracy check wrote into the compiled model's copy
    state = compiled.graph.state["b_cache"]
    pointer = state.data_ptr()
    for step in range(3):
        args = (torch.tensor([1, 3]), torch.tensor([[step, step + 4], [step + 1, step + 2]]), torch.randn(2, 2, 3))
        want = model(*args)
        got = compiled(*args)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(compiled.graph.state["b_cache"], model.cache)
    assert compiled.graph.state["b_cache"].data_ptr() == pointer
    return compiled


def test_a_write_nothing_else_reads_runs_in_place():
    compiled = run(read_old_first=False)
    assert list(in_place_writes(compiled.graph).values()) == [torch.ops.aten.index_put_.default]
    assert "aten.index_put_.default" in compiled.executable.module.code


def test_a_write_whose_old_value_is_read_stays_functional():
    compiled = run(read_old_first=True)
    assert in_place_writes(compiled.graph) == {}
    assert "aten.index_put_.default" not in compiled.executable.module.code
