"""The onnxruntime backend: zoo and Hugging Face models within 1e-4 of eager, PyTorch fallback for
what it cannot lower, artifacts that load in a fresh process, and the bad inputs it must refuse."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import onnxruntime as ort
import pytest
import safetensors.torch
import torch
from torch.export import Dim

import blade
import blade.models as zoo
from blade.backends import onnxruntime as ort_backend
from blade.errors import ArtifactError, BackendError, ShapeError

from helpers import assert_matches, forbid_recompiling, fresh_dims
from test_hf import build, make_inputs

TOL = 1e-4


@pytest.fixture(scope="module", params=zoo.names())
def zoo_case(request):
    model, example_inputs, dynamic_shapes = zoo.get(request.param)
    return request.param, model, blade.compile(model, example_inputs, dynamic_shapes=dynamic_shapes,
                                               backend="onnxruntime")


def test_zoo_models_run_in_onnxruntime(zoo_case, monkeypatch):
    name, model, cm = zoo_case
    details = cm.report.backend_details
    assert details["nodes"]["torch"] == 0 and details["opset"] == 20, cm.report
    forbid_recompiling(monkeypatch)
    monkeypatch.setattr(torch.onnx, "export", None)
    for seed in (1, 2):
        inputs = zoo.sample_inputs(name, seed=seed, **fresh_dims(name))
        with torch.no_grad():
            assert_matches(cm(*inputs), model(*inputs), tol=TOL)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hugging_face_models(name):
    model = build(name, "eager")
    ids, mask = make_inputs(2, 8, seed=0)
    dims = {"input_ids": {0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=64)}}
    dims["attention_mask"] = dims["input_ids"]
    cm = blade.compile(model, example_kwargs={"input_ids": ids, "attention_mask": mask}, dynamic_shapes=dims,
                       backend="onnxruntime")
    assert cm.report.backend_details["nodes"]["torch"] == 0
    for batch, seq in ((3, 13), (1, 64)):
        ids, mask = make_inputs(batch, seq, seed=batch)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask)
        out = cm(input_ids=ids, attention_mask=mask)
        assert type(out) is type(ref)
        assert_matches(dict(out), dict(ref), tol=TOL)


@torch.library.custom_op("blade_test::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _(x):
    return torch.empty_like(x)


class WithCustomOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)

    def forward(self, x):
        y = twice(self.first(x).relu())
        return self.second(y).view(x.shape[0], -1).softmax(-1), x.shape[1] * 2


DIMS = ({0: Dim("batch", min=1, max=16), 1: Dim("seq", min=2, max=32)},)


@pytest.fixture(scope="module")
def fallback():
    model = WithCustomOp().eval()
    return model, blade.compile(model, (torch.randn(2, 5, 64),), dynamic_shapes=DIMS, backend="onnxruntime")


def test_unlowerable_op_runs_on_pytorch(fallback):
    model, cm = fallback
    details = cm.report.backend_details
    engines = [r["engine"] for r in details["regions"]]
    assert engines == ["onnxruntime", "torch", "onnxruntime", "torch"]
    assert details["regions"][1]["reason"] == "no ONNX translation for blade_test.twice.default"
    assert "fallback  region 1 (1 nodes) on PyTorch: no ONNX translation for blade_test.twice.default" in str(cm.report)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        assert_matches(cm(x), model(x), tol=TOL)


def test_rejected_region_falls_back_with_the_reason(monkeypatch):
    def refuse(graph, inputs, device="cpu"):
        raise RuntimeError("Unsupported op for this test")
    monkeypatch.setattr(ort_backend, "export_region", refuse)
    model = zoo.get("mlp")[0]
    cm = blade.compile(model, zoo.get("mlp")[1], backend="onnxruntime")
    (region,) = cm.report.backend_details["regions"]
    assert region["engine"] == "torch" and "RuntimeError: Unsupported op for this test" in region["reason"]
    x = zoo.sample_inputs("mlp", seed=3)
    with torch.no_grad():
        assert_matches(cm(*x), model(*x), tol=TOL)


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch, safetensors.torch, blade
    torch.library.define("blade_test::twice", "(Tensor x) -> Tensor")
    torch.library.impl("blade_test::twice", "CPU")(lambda x: x * 2)
    cm = blade.load(sys.argv[1], trusted_namespaces=("blade_test",))
    out, size = cm(safetensors.torch.load_file(sys.argv[2])["x"])
    safetensors.torch.save_file({"out": out}, sys.argv[3])
    assert not any(m.startswith("test_") for m in sys.modules)
    print(size)
""")


def test_artifact_loads_in_a_fresh_process(fallback, tmp_path):
    model, cm = fallback
    cm.save(tmp_path / "m.blade")
    x = torch.randn(4, 9, 64)
    safetensors.torch.save_file({"x": x}, tmp_path / "in.safetensors")
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "m.blade"),
                             str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "18"
    with torch.no_grad():
        assert_matches(safetensors.torch.load_file(tmp_path / "out.safetensors")["out"], model(x)[0], tol=TOL)


def _resign(path, relpath: str) -> None:
    """Recompute a file's hash in the manifest (and the manifest's own), so only the content is wrong."""
    from blade.runtime.artifact import _canonical

    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("manifest_sha256")
    manifest["files"][relpath] = hashlib.sha256((path / relpath).read_bytes()).hexdigest()
    manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def saved(fallback, tmp_path):
    fallback[1].save(tmp_path / "m.blade")
    return tmp_path / "m.blade"


def test_corrupt_onnx_is_refused_naming_the_file(saved):
    (saved / "backend" / "region_0.onnx").write_bytes(b"\x08\x07garbage")
    _resign(saved, "backend/region_0.onnx")
    with pytest.raises(ArtifactError, match="ONNX model region_0.onnx .* could not be loaded"):
        blade.load(saved, trusted_namespaces=("blade_test",))


def test_truncated_onnx_and_missing_external_data_are_refused(saved):
    data = saved / "backend" / "region_0.onnx.data"
    assert data.exists(), "weights above 1 KiB are stored as external data"
    data.write_bytes(data.read_bytes()[:100])
    _resign(saved, "backend/region_0.onnx.data")
    with pytest.raises(ArtifactError, match="region_0.onnx"):
        blade.load(saved, trusted_namespaces=("blade_test",))
    data.unlink()
    with pytest.raises(ArtifactError, match="region_0.onnx.data is missing"):
        blade.load(saved, trusted_namespaces=("blade_test",))


def test_incompatible_blade_version_is_refused(saved):
    from blade.runtime.artifact import _canonical

    manifest = json.loads((saved / "manifest.json").read_text())
    manifest.pop("manifest_sha256")
    manifest["blade_version"] = "9.0.0"
    manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="written by blade 9.0.0"):
        blade.load(saved)


def test_custom_ops_need_trust(saved):
    with pytest.raises(ArtifactError, match="custom operator blade_test.twice.default.*trusted_namespaces"):
        blade.load(saved)


def test_bad_inputs_stop_before_onnxruntime(fallback, monkeypatch):
    _, cm = fallback
    monkeypatch.setattr(ort.InferenceSession, "run", None)  # reaching ONNX Runtime would fail differently
    with pytest.raises(ShapeError, match="expected dtype fp32"):
        cm(torch.randn(2, 5, 64, dtype=torch.float64))
    with pytest.raises(ShapeError, match="'seq'"):
        cm(torch.randn(2, 50, 64))


def test_plain_onnx_for_any_consumer(tmp_path, fallback):
    model, example_inputs, dynamic_shapes = zoo.get("bert")
    cm = blade.compile(model, example_inputs, dynamic_shapes=dynamic_shapes, backend="onnxruntime")
    cm.executable.to_onnx(tmp_path / "bert.onnx")
    session = ort.InferenceSession(str(tmp_path / "bert.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [d for d in session.get_inputs()[0].shape] == ["batch", "seq"]
    ids, mask = zoo.sample_inputs("bert", seed=9, batch=2, seq=11)
    hidden, _ = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        assert_matches(torch.from_numpy(hidden), model(ids, mask)[0], tol=TOL)
    with pytest.raises(BackendError, match="does not run in ONNX Runtime alone"):
        fallback[1].executable.to_onnx(tmp_path / "partitioned.onnx")


@torch.library.custom_op("blade_test::positives", mutates_args=())
def positives(x: torch.Tensor) -> torch.Tensor:
    return x[x > 0]


@positives.register_fake
def _(x):
    return x.new_empty(torch.library.get_ctx().new_dynamic_size())


@torch.library.custom_op("blade_test::doubled_rows", mutates_args=())
def doubled_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x])


@doubled_rows.register_fake
def _(x):
    return x.new_empty(2 * x.shape[0], x.shape[1])


class SizesAcrossRegions(torch.nn.Module):
    """Sizes made in one region are read in another; one size is data-dependent, one is 2*b."""

    def forward(self, x):
        kept = positives(x.relu().flatten())
        rows = doubled_rows(x)
        return kept * 2, (rows.view(x.shape[0], 2, -1) * 3).sum(1), rows[1:] + 1


def test_sizes_crossing_regions_keep_the_order_right():
    model = SizesAcrossRegions()
    cm = blade.compile(model, (torch.randn(3, 4),), dynamic_shapes=({0: Dim("b", min=2, max=16)},),
                       backend="onnxruntime")
    engines = [r["engine"] for r in cm.report.backend_details["regions"]]
    assert engines.count("torch") >= 1 and cm.report.backend_details["nodes"]["onnxruntime"] >= 4, cm.report
    assert not any("export or session failed" in r["reason"] for r in cm.report.backend_details["regions"])
    for rows in (2, 5, 16):
        x = torch.randn(rows, 4)
        assert_matches(cm(x), model(x), tol=TOL)


class Cummax(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.second(torch.cummax(self.first(x).relu(), 1)[0]).softmax(-1)


def test_an_op_the_exporter_refuses_falls_back_alone():
    model = Cummax().eval()
    cm = blade.compile(model, (torch.randn(2, 16),), dynamic_shapes=({0: Dim("b", min=1, max=16)},),
                       backend="onnxruntime")
    details = cm.report.backend_details
    assert [r["engine"] for r in details["regions"]] == ["onnxruntime", "torch", "onnxruntime"]
    reason = details["regions"][1]["reason"]
    assert reason.startswith("aten.cummax.default (cummax): the ONNX exporter cannot translate it: DispatchError")
    assert "\x1b" not in reason
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert_matches(cm(x), model(x), tol=TOL)


@pytest.mark.slow
def test_bert_base_graph_is_no_larger_than_the_transformers_optimizers(tmp_path):
    """The ONNX graph blade hands to ONNX Runtime for zoo bert base has no more nodes than
    onnxruntime.transformers.optimizer makes of a plain export of the same model."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    model, example, dims = zoo.get("bert", "base")
    cm = blade.compile(model, example, dynamic_shapes=dims, backend="onnxruntime")
    (step,) = [s for s in cm.executable.steps if s.file]
    blade_nodes = len(onnx.load(str(cm.executable.workdir / step.file), load_external_data=False).graph.node)
    with torch.no_grad():
        torch.onnx.export(model, example, dynamo=True, verbose=False).save(str(tmp_path / "plain.onnx"),
                                                                        external_data=True)
    config = zoo.bert.CONFIGS["base"]
    optimized = optimize_model(str(tmp_path / "plain.onnx"), model_type="bert", num_heads=config.n_heads,
                               hidden_size=config.hidden)
    assert blade_nodes <= len(optimized.model.graph.node), (blade_nodes, len(optimized.model.graph.node))
