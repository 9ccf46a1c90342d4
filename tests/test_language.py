"""torch.export's whole language compiled: torch.cond, torch.map and while_loop as nested graphs (passes run inside,
ONNX Runtime lowers cond to If and while_loop to Loop, map runs in PyTorch), input and buffer mutation written back,
unbounded and data-dependent sizes, and non-tensor inputs as specialised constants — each on eager and
onnxruntime, saved and loaded; what stays out of reach is refused naming the construct."""
import json

import pytest
import torch
from torch.export import Dim

import blade
from blade.errors import CaptureError, ShapeError
from blade.ir.fused import is_fused

BACKENDS = ["eager", "onnxruntime"]


def _same(got, want, tol=1e-6):
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=tol, atol=tol), (got - want).abs().max()


def _saved_and_loaded(compiled, tmp_path, backend):
    path = tmp_path / f"{backend}.blade"
    compiled.save(path)
    return blade.load(path)


class Branches(torch.nn.Module):
    """Data-dependent control flow: a linear + relu one way, a softmax the other."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: self.lin(x).relu() * 2, lambda x: torch.softmax(x * 2, -1), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cond_compiles_both_branches_and_saves(backend, tmp_path):
    model, x = Branches().eval(), torch.rand(3, 8) + 0.1
    compiled = blade.compile(model, (x,), dynamic_shapes=({0: Dim("batch", max=16)},), backend=backend)
    assert compiled.report.accuracy.ok
    (cond,) = [n for n in compiled.graph.call_nodes if "cond" in str(n.target)]
    branches = [sub for _, sub in compiled.graph.nested()]
    assert len(branches) == 2 and all(any(is_fused(n) for n in b.call_nodes) for b in branches), \
        "fusion ran inside both branches"
    if backend == "onnxruntime":
        assert compiled.report.backend_details["nodes"]["torch"] == 0, "cond is an ONNX If"
    loaded = _saved_and_loaded(compiled, tmp_path, backend)
    with torch.no_grad():
        for inputs in (x, -x, torch.randn(5, 8)):
            _same(compiled(inputs), model(inputs))
            _same(loaded(inputs), model(inputs))


class MapBody(torch.nn.Module):
    def forward(self, xs, y):
        return torch._higher_order_ops.map(lambda x, y: torch.sin(x) * 2 + y, xs, y)


class Loop(torch.nn.Module):
    def forward(self, x):
        return torch._higher_order_ops.while_loop(lambda i, x: i < 3, lambda i, x: (i + 1, x * 2 + 1),
                                                  (torch.tensor(0), x))[1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model, inputs", [(MapBody(), (torch.randn(5, 4), torch.randn(4))),
                                           (Loop(), (torch.randn(3, 4),))], ids=["map", "while_loop"])
def test_map_and_while_loop_compile_and_save(model, inputs, backend, tmp_path):
    compiled = blade.compile(model, inputs, backend=backend)
    assert compiled.report.accuracy.ok
    if backend == "onnxruntime":
        on_torch = compiled.report.backend_details["nodes"]["torch"]
        assert on_torch == (2 if isinstance(model, MapBody) else 0), "map runs in PyTorch, while_loop is a Loop"
    loaded = _saved_and_loaded(compiled, tmp_path, backend)
    fresh = tuple(torch.randn_like(t) for t in inputs)
    _same(compiled(*fresh), model(*fresh))
    _same(loaded(*fresh), model(*fresh))


class Writes(torch.nn.Module):
    """Input mutation (a cache the caller owns) and buffer mutation (a counter the model keeps)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(4))

    def forward(self, x, cache):
        cache.add_(x)
        self.calls.add_(1)
        return x * 2 + self.calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_and_buffer_mutation_are_written_back(backend, tmp_path):
    model, x = Writes(), torch.arange(4.0)
    example_cache = torch.zeros(4)
    compiled = blade.compile(model, (x, example_cache), backend=backend)
    assert compiled.report.accuracy.ok
    assert torch.equal(example_cache, torch.zeros(4)) and torch.equal(model.calls, torch.zeros(4)), \
        "compiling (and its accuracy check) changes neither the example nor the model's buffers"
    assert sorted(compiled.graph.mutations) == ["b_calls", "cache"]
    eager, eager_cache = Writes(), torch.zeros(4)
    cache = torch.zeros(4)
    for _ in range(3):
        _same(compiled(x, cache), eager(x, eager_cache))
        _same(cache, eager_cache)
    _same(compiled.state["calls"], eager.calls)
    assert torch.equal(model.calls, torch.zeros(4)), "the compiled model keeps its own copy of the state"
    loaded = _saved_and_loaded(compiled, tmp_path, backend)  # saved with three calls counted
    io = json.loads((tmp_path / f"{backend}.blade" / "manifest.json").read_text())["io"]
    assert [i.get("state") for i in io["inputs"]] == [None, None, "calls"]
    assert sorted(o.get("writes", "") for o in io["outputs"]) == ["", "b_calls", "cache"]
    again = torch.zeros(4)
    _same(loaded(x, again), eager(x, eager_cache))
    _same(again, x)


def test_a_non_contiguous_mutated_input_is_written_back_in_place():
    base = torch.zeros(4, 2)
    cache = base[:, 0]  # a strided view: the compiled model runs on a dense copy and writes the view
    compiled = blade.compile(Writes(), (torch.ones(4), torch.zeros(4)), backend="eager")
    compiled(torch.ones(4), cache)
    assert torch.equal(base[:, 0], torch.ones(4)) and torch.equal(base[:, 1], torch.zeros(4))


def test_a_wrong_write_back_fails_the_accuracy_check(monkeypatch):
    """The mutated values are part of the check: a compile that writes the wrong value is caught."""
    import blade.passes.cleanup as cleanup

    def drop_the_write(graph, ctx):
        last = graph.outputs[-1]
        graph.outputs[-1] = graph.add_node(torch.ops.aten.mul.Tensor, (last, 0.0), meta=dict(last.meta), name="zero")
        return graph

    compiled = blade.compile(Writes(), (torch.ones(4), torch.zeros(4)), backend="eager",
                             passes=[cleanup.run, drop_the_write])
    assert compiled.report.bisection["culprits"][0]["pass"] == "drop_the_write"


class ItemSized(torch.nn.Module):
    """A size known only at run time (n.item(), unbounded on both sides) and dims without an upper bound."""

    def forward(self, x, n):
        k = n.item()
        return x * k + x.shape[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbounded_and_data_dependent_sizes(backend, tmp_path):
    x, n = torch.randn(3, 4), torch.tensor(3)
    compiled = blade.compile(ItemSized(), (x, n), dynamic_shapes=({0: Dim("batch")}, None), backend=backend)
    assert compiled.graph.dims["batch"].max is None
    unbacked = [r for r in compiled.graph.dims.values() if r.name != "batch"]
    assert unbacked and unbacked[0].min is None and unbacked[0].max is None
    assert "-inf" in str(compiled.report) or "inf" in str(unbacked[0])
    loaded = _saved_and_loaded(compiled, tmp_path, backend)
    for inputs in ((torch.randn(7, 4), torch.tensor(-2)), (x, n)):
        _same(compiled(*inputs), ItemSized()(*inputs))
        _same(loaded(*inputs), ItemSized()(*inputs))


class Flags(torch.nn.Module):
    def forward(self, x, scale: float, mode: str = "double", apply: bool = True):
        if not apply:
            return x
        return x * scale * (2 if mode == "double" else 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_tensor_inputs_are_specialised_constants_with_a_guard(backend, tmp_path):
    x = torch.randn(4)
    compiled = blade.compile(Flags(), (x, 0.5, "triple"), example_kwargs={"apply": True}, backend=backend)
    assert any("mode = 'triple'" in s for s in compiled.report.specialized)
    _same(compiled(x, 0.5, "triple", apply=True), x * 1.5)
    loaded = _saved_and_loaded(compiled, tmp_path, backend)
    _same(loaded(x, 0.5, mode="triple", apply=True), x * 1.5)
    for call, named in (((x, 0.5, "double"), "mode"), ((x, 0.25, "triple"), "scale")):
        with pytest.raises(ShapeError, match=f"input '{named}' was specialised to"):
            compiled(*call, apply=True)
    with pytest.raises(ShapeError, match="input 'apply' was specialised to True"):
        loaded(x, 0.5, "triple", apply=False)


def test_what_stays_out_of_reach_is_refused_naming_the_construct():
    class DynamicInt(torch.nn.Module):
        def forward(self, x, k: int):
            return x * k

    with pytest.raises(CaptureError, match="a dynamic number .*pass it as a 0-d tensor"):
        blade.compile(DynamicInt(), (torch.randn(4), 3), dynamic_shapes=(None, Dim.DYNAMIC), backend="eager")


@torch.library.custom_op("blade_test::double_", mutates_args=("x",))
def _double_(x: torch.Tensor) -> None:
    x.mul_(2)


@_double_.register_fake
def _double_fake(x):
    return None


def test_a_custom_op_that_mutates_is_refused_naming_it():
    class Mutating(torch.nn.Module):
        def forward(self, x):
            y = x.clone()
            _double_(y)
            return y + 1

    with pytest.raises(CaptureError, match="custom operator blade_test.double_.* mutates its inputs"):
        blade.compile(Mutating(), (torch.randn(4),), backend="eager")
