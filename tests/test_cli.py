"""The command line: compile → inspect → run on an artifact, bench, demo; --json; exit codes. The commands run
in this process (helpers.run_cli); one test runs `python -m blade` itself for the entry point's exit codes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import blade
import blade.models as zoo
from helpers import run_cli as blade_cli


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "mlp.blade"
    result = blade_cli("compile", "blade.models.mlp:tiny", "-o", str(path), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["report"]["accuracy"]["ok"] and data["artifact"] == str(path)
    return path


def test_compile_shows_progress_without_json(tmp_path):
    result = blade_cli("compile", "blade.models.mlp:tiny", "-o", str(tmp_path / "m.blade"))
    assert result.returncode == 0, result.stderr
    assert "capturing and compiling blade.models.mlp:tiny" in result.stderr
    assert "blade compile report" in result.stdout


def test_inspect(artifact):
    result = blade_cli("inspect", str(artifact), "--graph")
    assert result.returncode == 0, result.stderr
    assert "input   input: float32[batch, 16]" in result.stdout
    assert "dims    batch in [1, 64]" in result.stdout and "aten.linear.default" in result.stdout
    data = json.loads(blade_cli("inspect", str(artifact), "--json").stdout)
    assert data["backend"] == "onnxruntime" and "backend/region_0.onnx" in data["files"]


def test_run_with_inputs_file(artifact, tmp_path):
    model, _, _ = zoo.get("mlp")
    (x,) = zoo.sample_inputs("mlp", seed=7, batch=5)
    safetensors.torch.save_file({"input": x}, tmp_path / "in.safetensors")
    out_file = tmp_path / "out.safetensors"
    result = blade_cli("run", str(artifact), "--inputs", str(tmp_path / "in.safetensors"), "-o", str(out_file),
                       "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"]["output_0"]["shape"][0] == 5
    with torch.no_grad():
        assert torch.allclose(safetensors.torch.load_file(out_file)["output_0"], model(x), rtol=1e-6, atol=1e-7)


def test_run_rejects_bad_inputs(artifact, tmp_path):
    safetensors.torch.save_file({"input": torch.randn(5, 3)}, tmp_path / "bad.safetensors")
    result = blade_cli("run", str(artifact), "--inputs", str(tmp_path / "bad.safetensors"))
    assert result.returncode == 1
    assert "input 'input' dim 1: expected 16 (static), got 3" in result.stderr
    safetensors.torch.save_file({"y": torch.randn(5, 16)}, tmp_path / "wrong.safetensors")
    result = blade_cli("run", str(artifact), "--inputs", str(tmp_path / "wrong.safetensors"))
    assert result.returncode == 1 and "lacks input(s) ['input']" in result.stderr


def test_failures_exit_non_zero(tmp_path):
    result = blade_cli("compile", "no.such.module:tiny", "-o", str(tmp_path / "x.blade"))
    assert result.returncode == 1 and "cannot load factory 'no.such.module:tiny'" in result.stderr
    result = blade_cli("run", str(tmp_path))
    assert result.returncode == 1 and "manifest.json is missing" in result.stderr
    assert blade_cli("compile").returncode == 2  # usage error


def test_python_m_blade_exits_with_the_commands_code(tmp_path):
    run = subprocess.run([sys.executable, "-m", "blade", "run", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1 and "manifest.json is missing" in run.stderr


def test_bench_and_demo_json():
    result = blade_cli("bench", "blade.models.mlp:tiny", "--repeat", "5", "--warmup", "1", "--json")
    assert result.returncode == 0, result.stderr
    bench = json.loads(result.stdout)
    assert bench["eager_ms"] > 0 and bench["blade_ms"] > 0 and bench["speedup"] > 0
    for who in ("eager", "blade"):  # utilization of both from the same IR figures and measured peaks
        seconds = bench[f"{who}_ms"] / 1e3
        assert bench[f"{who}_mfu"] == pytest.approx(bench["flops"] / seconds / bench["peak_flops"])
        assert bench[f"{who}_mbu"] == pytest.approx(bench["bytes"] / seconds / bench["bandwidth"])
    batch = 2  # mlp tiny: 16 -> 32 -> 32 -> 10 with GELU between; matmuls, biases, GELUs
    assert bench["flops"] == 2 * batch * (16 * 32 + 32 * 32 + 32 * 10) + batch * (32 + 32 + 10) + batch * (32 + 32)
    result = blade_cli("demo", "--model", "mlp", "--repeat", "5", "--json")
    assert result.returncode == 0, result.stderr
    demo = json.loads(result.stdout)
    assert demo["ok"] and demo["report"]["backend"] == "onnxruntime"


def test_compile_writes_plain_onnx(tmp_path):
    import onnxruntime as ort

    result = blade_cli("compile", "blade.models.mlp:tiny", "-o", str(tmp_path / "m.blade"), "--backend",
                       "onnxruntime", "--onnx", str(tmp_path / "m.onnx"))
    assert result.returncode == 0, result.stderr
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 16]
    result = blade_cli("compile", "blade.models.mlp:tiny", "-o", str(tmp_path / "e.blade"), "--backend", "eager",
                       "--onnx", str(tmp_path / "e.onnx"))
    assert result.returncode == 1 and "--onnx needs --backend onnxruntime" in result.stderr


def test_compile_quantized_with_calibration_files(tmp_path):
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for seed in range(2):
        (x,) = zoo.sample_inputs("mlp", seed=20 + seed, batch=4)
        safetensors.torch.save_file({"input": x}, calibration / f"sample{seed}.safetensors")
    out = tmp_path / "q.blade"
    result = blade_cli("compile", "blade.models.mlp:tiny", "-o", str(out), "--quantize", "int8_static",
                       "--calibration", str(calibration), "--accuracy-budget", "0.05", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)["report"]["quantization"]
    assert summary["quantize"] == "int8_static" and summary["calibration_samples"] == 2
    assert summary["error_backend"] <= 0.05 and len(summary["layers"]) == 3
    loaded = blade.load(out)
    assert any(n.target == torch.ops.blade.qlinear.default for n in loaded.graph.call_nodes)
    # held to its own budget (static scales from two samples may clip a fresh input: pass or fail is data-dependent)
    verified = blade_cli("verify", str(out), "--against", "blade.models.mlp:tiny")
    assert "tolerance 0.05 (relative error per output)" in verified.stdout, verified.stdout + verified.stderr
    missing = blade_cli("compile", "blade.models.mlp:tiny", "-o", str(tmp_path / "x.blade"), "--quantize",
                        "int8_static", "--calibration", str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and "--calibration" in missing.stderr and "no safetensors file" in missing.stderr
    bf16 = blade_cli("compile", "blade.models.mlp:tiny", "-o", str(tmp_path / "h.blade"), "--precision", "bf16",
                     "--backend", "eager", "--json")
    assert bf16.returncode == 0, bf16.stderr
    assert json.loads(bf16.stdout)["report"]["quantization"]["precision"] == "bf16"
    low = blade_cli("compile", "blade.models.mlp:tiny", "-o", str(tmp_path / "l.blade"), "--precision", "bf16",
                    "--backend", "eager", "--low-precision-outputs")
    assert low.returncode == 0, low.stderr
    (x,) = zoo.sample_inputs("mlp", seed=3, batch=4)
    assert blade.load(tmp_path / "l.blade")(x).dtype == torch.bfloat16
    assert blade.load(tmp_path / "h.blade")(x).dtype == torch.float32
    alone = blade_cli("compile", "blade.models.mlp:tiny", "-o", str(tmp_path / "a.blade"), "--low-precision-outputs")
    assert alone.returncode != 0 and "precision='fp16' or 'bf16'" in alone.stderr
