"""blade export --triton-repo: the repository layout, config.pbtxt against Triton's ModelConfig schema, and the
served models' outputs (ONNX Runtime on model.onnx; the Python-backend model.py under a stand-in pb_utils)."""
import importlib.util
import json
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

import blade
import blade.models as zoo
from blade.errors import InputError
from blade.tools.serving import export_triton_repo
from helpers import run_cli


def _parse_config(path):
    model_config = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient (test extra)")
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config.ModelConfig())


def _schema():
    return pytest.importorskip("tritonclient.grpc.model_config_pb2")


@pytest.fixture(scope="module")
def bert_artifacts(tmp_path_factory):
    model, example, dynamic = zoo.get("bert")
    root = tmp_path_factory.mktemp("serving")
    paths = {}
    for backend in ("onnxruntime", "eager"):
        cm = blade.compile(model, example, dynamic_shapes=dynamic, backend=backend)
        paths[backend] = root / f"bert_{backend}.blade"
        cm.save(paths[backend])
    return model, paths


def test_onnxruntime_artifact_becomes_an_onnx_model_with_a_valid_config(bert_artifacts, tmp_path):
    model, paths = bert_artifacts
    result = export_triton_repo(paths["onnxruntime"], tmp_path / "repo", name="bert", max_batch=16)
    model_dir = tmp_path / "repo" / "bert"
    assert result.kind == "onnxruntime" and result.model_dir == model_dir
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()) == \
        ["1/model.onnx", "1/model.onnx.data", "config.pbtxt"]
    config = _parse_config(model_dir / "config.pbtxt")
    assert config.name == "bert" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert [(t.name, list(t.dims)) for t in config.input] == [("input_ids", [-1]), ("attention_mask", [-1])]
    schema = _schema()
    assert [t.data_type for t in config.input] == [schema.TYPE_INT64] * 2
    assert [list(t.dims) for t in config.output] == [[-1, 32], [32]]
    assert config.output[0].data_type == schema.TYPE_FP32
    assert config.HasField("dynamic_batching")
    assert [(g.kind, g.count) for g in config.instance_group] == [(schema.ModelInstanceGroup.KIND_CPU, 1)]

    # what the server would run: model.onnx in ONNX Runtime, fed by the config's names, on a new batch size
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = zoo.sample_inputs("bert", batch=3, seq=11, seed=5)
    served = session.run([t.name for t in config.output],
                         {t.name: x.numpy() for t, x in zip(config.input, inputs)})
    with torch.no_grad():
        expected = model(*inputs)
    for got, want in zip(served, expected):
        assert torch.linalg.norm(torch.from_numpy(got) - want) / torch.linalg.norm(want) < 1e-4


class _StandIn:
    """The parts of Triton's triton_python_backend_utils that a Python-backend model touches."""

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class TritonError(Exception):
        pass

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.get(name)


def test_eager_artifact_becomes_a_python_backend_model_that_serves(bert_artifacts, tmp_path, monkeypatch):
    model, paths = bert_artifacts
    result = export_triton_repo(paths["eager"], tmp_path / "repo")
    model_dir = result.model_dir
    assert result.kind == "python" and (model_dir / "1" / "model.py").is_file()
    assert (model_dir / "1" / "model.blade" / "manifest.json").is_file()
    config = _parse_config(model_dir / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 64  # the zoo's batch range is [1, 64]
    assert [t.name for t in config.output] == ["output_0", "output_1"]

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.SimpleNamespace(**{
        k: getattr(_StandIn, k) for k in ("Tensor", "TritonError", "InferenceResponse", "get_input_tensor_by_name")}))
    spec = importlib.util.spec_from_file_location("served_model", model_dir / "1" / "model.py")
    served = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(served)
    instance = served.TritonPythonModel()
    instance.initialize({"model_repository": str(model_dir), "model_version": "1"})
    good = zoo.sample_inputs("bert", batch=2, seq=9, seed=3)
    request = {t.name: _StandIn.Tensor(t.name, x.numpy()) for t, x in zip(config.input, good)}
    bad = {"input_ids": _StandIn.Tensor("input_ids", good[0].numpy().astype(np.float32)),
           "attention_mask": request["attention_mask"]}
    ok, refused = instance.execute([request, bad])
    with torch.no_grad():
        expected = model(*good)
    assert ok.error is None and [t.name for t in ok.output_tensors] == ["output_0", "output_1"]
    for tensor, want in zip(ok.output_tensors, expected):
        assert torch.linalg.norm(torch.from_numpy(tensor.as_numpy()) - want) / torch.linalg.norm(want) < 1e-5
    assert refused.error is not None and "input 'input_ids'" in str(refused.error)


def test_bad_export_requests_are_refused(bert_artifacts, tmp_path):
    _, paths = bert_artifacts
    with pytest.raises(InputError, match="--max-batch 65 is outside the artifact's range for batch: \\[1, 64\\]"):
        export_triton_repo(paths["onnxruntime"], tmp_path / "repo", max_batch=65)
    assert not (tmp_path / "repo" / "Bert").exists()
    export_triton_repo(paths["onnxruntime"], tmp_path / "repo")
    with pytest.raises(InputError, match="Bert already exists"):
        export_triton_repo(paths["onnxruntime"], tmp_path / "repo")
    with pytest.raises(InputError, match="model name '../x' may hold only"):
        export_triton_repo(paths["onnxruntime"], tmp_path / "repo", name="../x")


def test_static_artifact_has_no_batching(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    cm = blade.compile(model, (torch.randn(2, 4),), backend="onnxruntime")
    cm.save(tmp_path / "mlp.blade")
    with pytest.raises(InputError, match="--max-batch needs a dynamic batch dim"):
        export_triton_repo(tmp_path / "mlp.blade", tmp_path / "repo", max_batch=4)
    result = export_triton_repo(tmp_path / "mlp.blade", tmp_path / "repo", name="mlp")
    config = _parse_config(result.model_dir / "config.pbtxt")
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [2, 4]
    assert not config.HasField("dynamic_batching") and "no dynamic batch" in result.notes[0]


def test_only_a_batch_dim_is_batched(tmp_path):
    """Triton joins requests along max_batch_size's axis: only a dim named batch (or --batch-dim) qualifies."""
    class SeqFirst(torch.nn.Module):  # mixes positions along dim 0: joining requests there would be wrong
        def forward(self, x):
            return torch.softmax(x, dim=0)

    cm = blade.compile(SeqFirst(), (torch.randn(5, 2, 4),), dynamic_shapes=({0: Dim("seq", min=1, max=128)},),
                       backend="onnxruntime")
    cm.save(tmp_path / "seq.blade")
    result = export_triton_repo(tmp_path / "seq.blade", tmp_path / "repo", name="seq")
    assert result.max_batch_size == 0 and "not named batch" in result.notes[0] and "--batch-dim seq" in result.notes[0]
    config = _parse_config(result.model_dir / "config.pbtxt")
    assert list(config.input[0].dims) == [-1, 2, 4] and not config.HasField("dynamic_batching")
    forced = export_triton_repo(tmp_path / "seq.blade", tmp_path / "repo", name="seq2", batch_dim="seq")
    assert forced.max_batch_size == 128 and forced.inputs[0].dims == [2, 4]
    with pytest.raises(InputError, match="--batch-dim heads is not a dynamic dim"):
        export_triton_repo(tmp_path / "seq.blade", tmp_path / "repo", name="seq3", batch_dim="heads")

    model = torch.nn.Linear(4, 3)
    cm = blade.compile(model, (torch.randn(3, 4),), dynamic_shapes=({0: Dim("batch", min=2, max=9)},),
                       backend="onnxruntime")
    cm.save(tmp_path / "lin.blade")
    result = export_triton_repo(tmp_path / "lin.blade", tmp_path / "repo", name="lin")
    assert result.max_batch_size == 0 and "starts at 2" in result.notes[0]
    assert _parse_config(result.model_dir / "config.pbtxt").input[0].dims == [-1, 4]


def test_scalars_unread_inputs_and_constant_outputs(tmp_path):
    class PerItem(torch.nn.Module):  # one scalar per batch item; `unused` is read by nothing
        def forward(self, x, unused):
            return x.sum(dim=1)

    batch = Dim("batch", min=1, max=8)
    cm = blade.compile(PerItem(), (torch.randn(3, 4), torch.randn(3)), dynamic_shapes=({0: batch}, {0: batch}),
                       backend="onnxruntime")
    cm.save(tmp_path / "item.blade")
    result = export_triton_repo(tmp_path / "item.blade", tmp_path / "repo", name="item")
    config = _parse_config(result.model_dir / "config.pbtxt")
    assert config.max_batch_size == 8 and [t.name for t in config.input] == ["x"]
    assert list(config.output[0].dims) == [1] and list(config.output[0].reshape.shape) == []
    assert any("['unused'] are read by nothing" in note for note in result.notes)

    class Constant(torch.nn.Module):
        def forward(self, x):
            return x * 2, 3

    cm = blade.compile(Constant(), (torch.randn(2, 2),), backend="eager")
    cm.save(tmp_path / "const.blade")
    with pytest.raises(blade.errors.BackendError, match="output 1 of .* is not a tensor"):
        export_triton_repo(tmp_path / "const.blade", tmp_path / "repo", name="const")


def test_cli_export_json(bert_artifacts, tmp_path):
    _, paths = bert_artifacts
    out = run_cli("export", paths["onnxruntime"], "--triton-repo", tmp_path / "repo", "--name", "b", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["kind"] == "onnxruntime" and data["max_batch_size"] == 64 and data["inputs"][0]["dims"] == [-1]
    again = run_cli("export", paths["onnxruntime"], "--triton-repo", tmp_path / "repo", "--name", "b")
    assert again.returncode == 1 and "already exists" in again.stderr
