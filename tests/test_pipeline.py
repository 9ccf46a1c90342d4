"""A deployment pipeline, each step a fresh process: torch.export.save → blade compile → blade verify →
blade export --triton-repo → blade run in a process that never imports the zoo; the verify gate and `--dynamic`
(the CLI in this process)."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch

import blade
import blade.models as zoo
from blade.frontend.dynamic import apply_ranges, parse_ranges
from blade.errors import ConfigError
from helpers import run_cli


def _python(code: str, *args, cwd=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def _blade(*args):
    return _python("import sys; from blade.tools.cli import main; sys.exit(main(sys.argv[1:]))", *args)


def _ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_pt2_to_served_repository_end_to_end(tmp_path):
    pt2, art, repo = tmp_path / "bert.pt2", tmp_path / "bert.blade", tmp_path / "repo"
    _ok(_python("""
        import sys, torch, blade.models as zoo
        model, example, dynamic = zoo.get("bert")  # dynamic batch (and seq)
        torch.export.save(torch.export.export(model, example, dynamic_shapes=dynamic), sys.argv[1])
    """, pt2))

    compiled = json.loads(_ok(_blade("compile", pt2, "-o", art, "--backend", "onnxruntime", "--json")).stdout)
    assert compiled["report"]["accuracy"]["ok"] and compiled["report"]["backend"] == "onnxruntime"
    assert compiled["report"]["dims"][0] == "input_ids_dim0 in [1, 64]"  # a .pt2 keeps ranges, not Dim names

    gate = json.loads(_ok(_blade("verify", art, "--against", pt2, "--samples", "3", "--json")).stdout)
    errors = [o["rel_err"] for sample in gate["samples"] for o in sample["outputs"]]
    assert gate["ok"] and len(gate["samples"]) == 4 and max(errors) <= 1e-4

    # a .pt2 keeps its dims' ranges but not their names: say which one is the batch
    export = json.loads(_ok(_blade("export", art, "--triton-repo", repo, "--name", "bert", "--batch-dim",
                                   "input_ids_dim0", "--json")).stdout)
    assert export["kind"] == "onnxruntime" and export["max_batch_size"] == 64
    layout = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    assert layout == ["bert/1/model.onnx", "bert/1/model.onnx.data", "bert/config.pbtxt"]
    model_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    config = text_format.Parse((repo / "bert" / "config.pbtxt").read_text(), model_config.ModelConfig())
    assert config.max_batch_size == 64 and [list(i.dims) for i in config.input] == [[-1], [-1]]

    inputs = zoo.sample_inputs("bert", batch=3, seq=17, seed=11)
    safetensors.torch.save_file({"input_ids": inputs[0], "attention_mask": inputs[1]}, tmp_path / "in.safetensors")
    # the serving process: blade and the artifact, never the model's code
    served = _ok(_python("""
        import sys
        from blade.tools.cli import main
        code = main(["run", sys.argv[1], "--inputs", sys.argv[2], "-o", sys.argv[3], "--json"])
        zoo = sorted(m for m in sys.modules if m == "blade.models" or m.startswith("blade.models."))
        assert not zoo, f"the serving process imported the zoo: {zoo}"
        sys.exit(code)
    """, art, tmp_path / "in.safetensors", tmp_path / "out.safetensors", cwd=tmp_path))
    assert json.loads(served.stdout)
    outputs = safetensors.torch.load_file(tmp_path / "out.safetensors")
    model, _, _ = zoo.get("bert")
    with torch.no_grad():
        expected = model(*inputs)
    for i, want in enumerate(expected):
        got = outputs[f"output_{i}"]
        assert got.shape == want.shape and float(torch.linalg.norm(got - want) / torch.linalg.norm(want)) < 1e-4


def test_verify_fails_on_perturbed_weights(tmp_path):
    """The gate: the same artifact with one weight changed (and its hashes redone) fails with figures."""
    from test_artifact import _rewrite_manifest

    art = tmp_path / "mlp.blade"
    _ok(run_cli("compile", "blade.models.mlp:tiny", "-o", art, "--backend", "eager", "--json"))
    weights = safetensors.torch.load_file(art / "weights.safetensors")
    name = max(weights, key=lambda k: weights[k].numel())
    weights[name] = weights[name] + 0.05 * torch.randn_like(weights[name])
    safetensors.torch.save_file(weights, art / "weights.safetensors")
    digest = hashlib.sha256((art / "weights.safetensors").read_bytes()).hexdigest()
    _rewrite_manifest(art, lambda m: m["files"].__setitem__("weights.safetensors", digest))
    gate = run_cli("verify", art, "--against", "blade.models.mlp:tiny", "--samples", "2")
    assert gate.returncode == 1
    assert "rel_err" in gate.stdout + gate.stderr and "FAIL" in (gate.stdout + gate.stderr).upper()


def test_dynamic_ranges_from_the_command_line(tmp_path):
    art = tmp_path / "bert.blade"
    _ok(run_cli("compile", "blade.models.bert:tiny", "-o", art, "--backend", "eager", "--dynamic", "batch=1:4,seq=2:48",
               "--json"))
    dims = json.loads((art / "manifest.json").read_text())["io"]["dims"]
    assert dims["batch"] == [1, 4] and dims["seq"] == [2, 48]
    loaded = blade.load(art)
    loaded(*zoo.sample_inputs("bert", batch=4, seq=48))
    with pytest.raises(blade.errors.ShapeError, match="batch"):
        loaded(*zoo.sample_inputs("bert", batch=5, seq=8))
    refused = run_cli("compile", "blade.models.bert:tiny", "-o", tmp_path / "x", "--dynamic", "heads=1:4")
    assert refused.returncode == 1 and "no dim of that name; it names ['batch', 'seq']" in refused.stderr
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(3, 2), (torch.randn(2, 3),)), pt2)
    refused = run_cli("compile", pt2, "-o", tmp_path / "y", "--dynamic", "batch=1:8")
    assert refused.returncode == 1 and "carries the dynamic dims it was exported with" in refused.stderr


def test_dynamic_conventions_without_source_dims():
    example = (torch.randn(2, 5, 3), torch.randn(2))
    spec = apply_ranges(parse_ranges("batch=1:16,seq=1:32"), example, None)
    assert [sorted(s) for s in spec] == [[0, 1], [0]]
    assert spec[0][0] is spec[1][0], "one dim shared by every input"
    linear = torch.nn.Linear(3, 4)
    cm = blade.compile(linear, (torch.randn(2, 5, 3),), dynamic_shapes=apply_ranges(
        parse_ranges("batch=1:16,seq=1:32"), (torch.randn(2, 5, 3),), None), backend="eager")
    x = torch.randn(7, 9, 3)
    torch.testing.assert_close(cm(x), linear(x))
    for bad, message in [("batch", "not NAME=MIN:MAX"), ("batch=4:2", "empty or negative"), ("b=1:2,b=1:3", "twice"),
                         ("", "at least one"), ("heads=1:4", "knows only")]:
        with pytest.raises(ConfigError, match=message):
            apply_ranges(parse_ranges(bad), example, None)
    assert parse_ranges("seq=8:") == {"seq": (8, None)}
    assert os.environ.get("BLADE_CACHE") == "0", "the suite runs with the compile cache off (conftest)"
