"""Accuracy bisection: a compile that misses its tolerance finds the pass and the rewrite at fault, holds it back,
names it in the report, and still compiles — through the Python API, measured auto, a backend's own lowering,
the CLI (`compile --passes`, `verify --bisect`); only when no held-back rewrite helps does it fall back."""
import json
import os
import sys
import textwrap

import pytest
import torch

import blade
from blade import backends
from blade.perf.accuracy import relative_error
from blade.backends.eager import EagerBackend, EagerExecutable
from blade.ir.fused import is_fused
from blade.passes import FUSION, cleanup
from helpers import run_cli

aten = torch.ops.aten


def clamp_relus(wrong=("relu_1",)):
    """A pass that rewrites relu(x) as clamp_min(x, 0): right, except at the nodes `wrong`, which clamp at 0.5."""
    def clamp_relus(graph, ctx):
        for node in graph.call_nodes:
            if node.target is aten.relu.default and ctx.allows(node.name):
                floor = 0.5 if node.name in wrong else 0.0
                new = graph.add_node(aten.clamp_min.default, (node.args[0], floor), meta=dict(node.meta),
                                     name="clamped")
                graph.replace_all_uses(node, new)
                graph.remove_node(node)
        return graph
    return clamp_relus


def ungated_corruption(graph, ctx):
    """A pass that is wrong in work it never offers to the bisection: it doubles the first output."""
    out = graph.outputs[0]
    doubled = graph.add_node(aten.mul.Tensor, (out, 2.0), meta=dict(out.meta), name="doubled")
    graph.outputs[0] = doubled
    return graph


def mlp(layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
                                 for _ in range(layers)]).eval()


X = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))


def _matches(compiled, model) -> bool:
    with torch.no_grad():
        return relative_error(compiled(X), model(X)) <= 1e-5


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_a_wrong_rewrite_is_found_held_back_and_named(backend):
    model = mlp()
    compiled = blade.compile(model, (X,), backend=backend, passes=[cleanup.run, clamp_relus(), *FUSION])
    report = compiled.report
    assert report.accuracy.ok and _matches(compiled, model)
    assert report.bisection["outcome"] == "held back"
    assert report.bisection["culprits"] == [{"pass": "clamp_relus", "site": "relu_1",
                                             "error_with": report.bisection["error_before"],
                                             "error_without": report.bisection["error_after"]}]
    assert report.bisection["error_before"] > 0.1 and report.bisection["error_after"] <= 1e-5
    record = next(r for r in report.passes if r["name"] == "clamp_relus")
    assert record["held_back"] == ["relu_1"]
    assert compiled.graph.count_targets()["aten.clamp_min.default"] == 3, "the other rewrites stay"
    assert "bisection held back clamp_relus at relu_1" in str(report)
    assert any("accuracy bisection held back 1 rewrite" in w for w in report.warnings)


def test_measured_auto_bisects_and_measures_the_repaired_graph_again():
    model = mlp()
    compiled = blade.compile(model, (X,), passes=[cleanup.run, clamp_relus(), *FUSION], autotune=True)
    assert _matches(compiled, model) and compiled.report.bisection["culprits"][0]["site"] == "relu_1"
    measured = {name: c for name, c in compiled.report.backend_candidates.items() if "ms" in c}
    assert {"onnxruntime", "eager"} <= set(measured), "both candidates timed on the repaired graph"


def test_two_wrong_rewrites_are_both_held_back():
    model = mlp()
    compiled = blade.compile(model, (X,), backend="eager", passes=[clamp_relus(("relu", "relu_2"))])
    assert _matches(compiled, model)
    assert sorted(c["site"] for c in compiled.report.bisection["culprits"]) == ["relu", "relu_2"]


def test_a_pass_wrong_outside_its_rewrites_is_skipped_whole():
    model = mlp()
    compiled = blade.compile(model, (X,), backend="eager", passes=[cleanup.run, ungated_corruption, *FUSION])
    assert _matches(compiled, model)
    assert [(c["pass"], c["site"]) for c in compiled.report.bisection["culprits"]] == [("ungated_corruption", "*")]
    assert "ungated_corruption at (the whole pass)" in str(compiled.report)
    assert any(r["name"].startswith("fuse_") and r["counts"] for r in compiled.report.passes), \
        "the other passes still run"


def test_beyond_the_culprit_limit_the_unoptimized_graph_runs():
    model = mlp(6)
    every = tuple(["relu"] + [f"relu_{i}" for i in range(1, 6)])  # six wrong rewrites: more than MAX_CULPRITS
    compiled = blade.compile(model, (X,), backend="eager", passes=[clamp_relus(every)])
    assert _matches(compiled, model)
    assert compiled.report.bisection["outcome"] == "unoptimized graph"
    assert "aten.clamp_min.default" not in compiled.graph.count_targets()


class _OffByOne(EagerExecutable):
    def __call__(self, *tensors):
        return [o + 1 for o in super().__call__(*tensors)]


class _MiscompilingBackend(EagerBackend):
    """The eager backend, except that it computes the fused region anchored at `relu_2` wrong (x + 1)."""

    name = "miscompiling"

    def compile(self, graph, target, example_inputs=None):
        bad = any(is_fused(n) and any(m.name == "relu_2" for m in n.target.body.call_nodes) for n in graph.call_nodes)
        return (_OffByOne if bad else EagerExecutable)(graph, target.device)


@pytest.fixture
def miscompiling():
    backends.register(_MiscompilingBackend())
    yield "miscompiling"
    backends.unregister("miscompiling")


def test_a_backends_own_wrong_lowering_is_searched_on_that_backend(miscompiling):
    model = mlp()
    compiled = blade.compile(model, (X,), backend=miscompiling)
    bisection = compiled.report.bisection
    assert _matches(compiled, model) and bisection["outcome"] == "held back"
    assert bisection["searched_on"] == "miscompiling", "eager runs the optimized graph right: searched on the backend"
    (culprit,) = bisection["culprits"]
    assert culprit["pass"] == "fuse_epilogues"
    assert sum(1 for n in compiled.graph.call_nodes if is_fused(n)) == 3, "only the one region is held back"


def test_a_right_compile_does_not_bisect():
    report = blade.compile(mlp(), (X,), backend="eager").report
    assert report.bisection == {} and "bisection" not in str(report)


@pytest.fixture
def broken_factory(tmp_path, monkeypatch):
    """A user's module `broken_mlp` with the model and the broken pipeline, for the CLI (run in this process)."""
    (tmp_path / "broken_mlp.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import torch
        from blade.passes import FUSION, cleanup
        from test_bisect import X, clamp_relus, mlp

        def model():
            return mlp(), (X,)

        PIPELINE = [cleanup.run, clamp_relus(), *FUSION]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("broken_mlp", None)


def test_cli_compile_with_a_broken_pipeline_bisects(broken_factory, tmp_path):
    run = run_cli("compile", "broken_mlp:model", "--backend", "eager", "--passes", "broken_mlp:PIPELINE", "-o",
                  str(tmp_path / "a.blade"))
    assert run.returncode == 0, run.stderr
    assert "bisection held back clamp_relus at relu_1" in run.stdout
    torch.testing.assert_close(blade.load(tmp_path / "a.blade")(X), mlp()(X))


def test_cli_verify_bisects_a_bad_artifact_and_writes_the_repair(broken_factory, tmp_path):
    bad = blade.compile(mlp(), (X,), backend="eager", passes=[cleanup.run, clamp_relus(), *FUSION],
                        check_accuracy=False)
    bad.save(tmp_path / "bad.blade")
    run = run_cli("verify", str(tmp_path / "bad.blade"), "--against", "broken_mlp:model", "--bisect", "--passes",
                  "broken_mlp:PIPELINE", "-o", str(tmp_path / "fixed.blade"), "--json")
    assert run.returncode == 1, run.stderr  # the artifact given fails its gate
    result = json.loads(run.stdout)
    assert not result["ok"] and result["bisection"]["culprits"][0]["site"] == "relu_1"
    assert result["bisection"]["repaired"] == str(tmp_path / "fixed.blade")
    fixed = run_cli("verify", str(tmp_path / "fixed.blade"), "--against", "broken_mlp:model")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "clamp_relus" in json.loads((tmp_path / "fixed.blade" / "manifest.json").read_text())["report"][
        "bisection"]["culprits"][0]["pass"]
