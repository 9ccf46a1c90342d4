"""blade verify: the accuracy gate of a pipeline passes a faithful artifact and fails a perturbed one."""
from __future__ import annotations

import json

import torch
from torch.export import Dim

import blade
import blade.models as zoo
from blade.tools.cli import main
from blade.tools.verify import fresh_inputs


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_faithful_artifact_passes_on_examples_and_fresh_inputs(tmp_path, capsys):
    model, example, dims = zoo.get("bert")
    blade.compile(model, example, dynamic_shapes=dims, backend="onnxruntime").save(tmp_path / "bert.blade")
    code, out, _ = run_cli(capsys, "verify", str(tmp_path / "bert.blade"), "--against", "blade.models.bert:tiny",
                           "--samples", "4", "--json")
    result = json.loads(out)
    assert code == 0 and result["ok"] and len(result["samples"]) == 5
    shapes = {tuple(s["shapes"][0]) for s in result["samples"]}
    assert len(shapes) > 1  # fresh inputs take other sizes inside the dynamic ranges
    assert all(s["worst_rel_err"] < 1e-5 for s in result["samples"])


def test_a_perturbed_artifact_fails_with_the_error_figures(tmp_path, capsys):
    model, example, dims = zoo.get("bert")
    with torch.no_grad():
        model.layers[0].ffn[0].weight.add_(0.05 * torch.randn_like(model.layers[0].ffn[0].weight))
    blade.compile(model, example, dynamic_shapes=dims, backend="eager").save(tmp_path / "bad.blade")
    code, out, _ = run_cli(capsys, "verify", str(tmp_path / "bad.blade"), "--against", "blade.models.bert:tiny")
    assert code == 1 and "FAILED" in out and "rel_err" in out
    assert "FAIL " in out.splitlines()[0]


def test_a_pt2_source_and_an_inputs_file(tmp_path, capsys):
    import safetensors.torch

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=16)},))
    torch.export.save(ep, tmp_path / "m.pt2")
    blade.compile(str(tmp_path / "m.pt2"), backend="eager").save(tmp_path / "m.blade")
    name = blade.load(tmp_path / "m.blade").graph.inputs[0].name
    safetensors.torch.save_file({name: torch.randn(5, 8)}, tmp_path / "in.safetensors")
    code, out, _ = run_cli(capsys, "verify", str(tmp_path / "m.blade"), "--against", str(tmp_path / "m.pt2"),
                           "--inputs", str(tmp_path / "in.safetensors"), "--tol", "1e-6")
    assert code == 0 and "passed" in out and "[[5, 8]]" in out


def test_fresh_inputs_stay_inside_the_ranges_and_keep_integer_values_valid():
    model, example, dims = zoo.get("bert")
    cm = blade.compile(model, example, dynamic_shapes=dims, backend="eager")
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids, mask = fresh_inputs(cm.graph, cm.example_inputs, generator)
        assert ids.shape == mask.shape and 1 <= ids.shape[0] <= 2 * example[0].shape[0]
        assert set(ids.unique().tolist()) <= set(example[0].unique().tolist())
        assert set(mask.unique().tolist()) <= set(example[1].unique().tolist())


def test_bad_inputs_are_named(tmp_path, capsys):
    model, example, dims = zoo.get("mlp")
    blade.compile(model, example, dynamic_shapes=dims, backend="eager").save(tmp_path / "m.blade")
    code, _, err = run_cli(capsys, "verify", str(tmp_path / "m.blade"), "--against", "blade.models.mlp:tiny",
                           "--inputs", str(tmp_path / "missing.safetensors"))
    assert code == 1 and "missing.safetensors does not exist" in err
    code, _, err = run_cli(capsys, "verify", str(tmp_path / "m.blade"), "--against", "no_such_module:tiny")
    assert code == 1 and "no_such_module:tiny" in err
