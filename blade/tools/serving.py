"""Triton Inference Server model repositories from artifacts: model.onnx + config.pbtxt, or a Python-backend model."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from blade.runtime.artifact import read_manifest, verify_files
from blade.serve.batching import batch_dim
from blade.errors import BackendError, InputError

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
                 "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
                 "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
ARTIFACT_DIR = "model.blade"  # inside the version directory of a Python-backend model


@dataclass
class TensorConfig:
    """One input or output of the served model: its name, Triton dtype and dims (-1 where dynamic)."""

    name: str
    dtype: str
    dims: list[int]
    reshape: bool = False  # a scalar per request: Triton needs dims [1], reshaped to [] for the model


@dataclass
class ServingExport:
    """What `export_triton_repo` wrote and decided."""

    model_dir: Path
    kind: str  # "onnxruntime" or "python"
    max_batch_size: int
    inputs: list[TensorConfig]
    outputs: list[TensorConfig]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"model_dir": str(self.model_dir), "kind": self.kind, "max_batch_size": self.max_batch_size,
                "inputs": [vars(t) for t in self.inputs], "outputs": [vars(t) for t in self.outputs],
                "notes": self.notes}


def export_triton_repo(artifact, repo, *, name: str | None = None, max_batch: int | None = None,
                       batch_dim: str | None = None) -> ServingExport:
    """Write `repo/<name>/` for Triton Inference Server from the blade artifact at `artifact`.

    An onnxruntime artifact that runs in ONNX Runtime alone becomes `1/model.onnx` (platform
    onnxruntime_onnx); any other artifact becomes a Python-backend model that loads the artifact.
    Triton batches (joins requests along the leading axis) only over a dim named `batch`, or the
    one `batch_dim` names.
    """
    import blade

    root = Path(artifact)
    manifest = read_manifest(root)
    verify_files(root, manifest)
    compiled = blade.load(root)
    name = name or _model_name(compiled.graph.name)
    if not name.replace("_", "").replace("-", "").isalnum():
        raise InputError(f"model name {name!r} may hold only letters, digits, '_' and '-' (it names a directory)")
    model_dir = Path(repo) / name
    if model_dir.exists():
        raise InputError(f"{model_dir} already exists; remove it or choose another --name")
    device = manifest["target"]["device"]
    if compiled.graph.mutations:
        raise BackendError(f"{root} writes back into {compiled.graph.mutations} (inputs it mutates, or buffers it keeps "
                           "as state): Triton requests share no tensors and batch unrelated callers, so such a model "
                           "cannot be served as one; make the new values outputs of the model instead")
    _check_outputs(compiled.graph)
    batch_dim, notes = _batch_dim(compiled.graph, batch_dim)
    max_batch_size = _max_batch_size(batch_dim, compiled.graph, max_batch)
    single_onnx = compiled.executable.exports_onnx()
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    try:
        if single_onnx:
            compiled.executable.to_onnx(version_dir / "model.onnx")
            inputs, outputs = _onnx_tensors(version_dir / "model.onnx", compiled.graph, max_batch_size, notes)
            header = ['platform: "onnxruntime_onnx"']
            if device == "cpu":
                notes.append("Triton's ONNX Runtime backend applies its own graph optimizations, including "
                             "SkipLayerNormFusion, which blade turns off on CPU as slower there")
        else:
            shutil.copytree(root, version_dir / ARTIFACT_DIR)
            inputs = [_tensor(n.name, n.val, max_batch_size) for n in compiled.graph.inputs]
            outputs = [_tensor(f"output_{i}", out.val, max_batch_size) for i, out in enumerate(compiled.graph.outputs)]
            bf16 = [t.name for t in inputs + outputs if t.dtype == "TYPE_BF16"]
            if bf16:
                raise BackendError(f"tensors {bf16} are bfloat16, which the Python backend cannot pass through numpy; "
                                   "serve an onnxruntime artifact, or compile with float32 inputs and outputs "
                                   "(keep_output_dtype=True, the default)")
            (version_dir / "model.py").write_text(_PYTHON_MODEL.format(artifact=ARTIFACT_DIR))
            header = ['backend: "python"']
            notes.append(f"Python backend: the server's Python environment needs blade {blade.__version__} "
                         "and its dependencies installed")
        config = _config_text(name, header, max_batch_size, inputs, outputs, device)
        (model_dir / "config.pbtxt").write_text(config)
    except Exception:
        shutil.rmtree(model_dir, ignore_errors=True)
        raise
    return ServingExport(model_dir, "onnxruntime" if single_onnx else "python", max_batch_size, inputs, outputs, notes)


def _model_name(graph_name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in graph_name)
    return cleaned or "model"


def _check_outputs(graph) -> None:
    for i, out in enumerate(graph.outputs):
        if not hasattr(getattr(out, "val", None), "shape"):
            raise BackendError(f"output {i} of {graph.name} is not a tensor ({out!r}); Triton Inference Server "
                               "serves tensors only — return it as a tensor from the model")


def _batch_dim(graph, asked: str | None) -> tuple[str | None, list[str]]:
    """The dynamic dim Triton may batch over (blade.serve's rule: named `batch` or `asked`, leading everything)."""
    dim, why_not = batch_dim(graph, asked)
    return dim, [f"{why_not} (Triton max_batch_size 0)"] if why_not else []


def _max_batch_size(batch_dim: str | None, graph, asked: int | None) -> int:
    if batch_dim is None:
        if asked is not None:
            raise InputError("--max-batch needs a dynamic batch dim leading every input and output; this "
                             "artifact has none (compile it with a dynamic batch dim)")
        return 0
    high = graph.dims[batch_dim].max
    if asked is None:
        if high is None:
            raise InputError(f"batch dim {batch_dim} has no upper bound; pass --max-batch")
        return int(high)
    if asked < 1 or (high is not None and asked > high):
        raise InputError(f"--max-batch {asked} is outside the artifact's range for {batch_dim}: "
                         f"[1, {'inf' if high is None else high}]")
    return asked


def _tensor(name: str, meta, max_batch_size: int) -> TensorConfig:
    dtype = str(meta.dtype).removeprefix("torch.")
    if dtype not in TRITON_DTYPES:
        raise BackendError(f"tensor {name} has dtype {dtype}, which Triton Inference Server has no type for")
    dims = [d if isinstance(d, int) else -1 for d in meta.shape]
    dims = dims[1:] if max_batch_size else dims
    return TensorConfig(name, TRITON_DTYPES[dtype], dims or [1], reshape=not dims)


def _onnx_tensors(path: Path, graph, max_batch_size: int, notes: list[str]):
    """The ONNX model's own inputs and outputs (the exporter drops inputs nothing reads), with the IR's specs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    in_names = [value.name for value in model.graph.input]
    out_names = [value.name for value in model.graph.output]
    by_name = {n.name: n for n in graph.inputs}
    if any(name not in by_name for name in in_names) or len(out_names) != len(graph.outputs):
        raise BackendError(f"the exported ONNX model's inputs {in_names} / {len(out_names)} outputs do not match "
                           "the artifact's graph; the artifact is damaged — recompile it")
    unread = [n.name for n in graph.inputs if n.name not in in_names]
    if unread:
        notes.append(f"inputs {unread} are read by nothing, so model.onnx and the config leave them out")
    inputs = [_tensor(name, by_name[name].val, max_batch_size) for name in in_names]
    outputs = [_tensor(name, out.val, max_batch_size) for name, out in zip(out_names, graph.outputs)]
    return inputs, outputs


def _config_text(name: str, header: list[str], max_batch_size: int, inputs, outputs, device: str) -> str:
    def entry(t: TensorConfig) -> str:
        reshape = " reshape: { shape: [ ] }" if t.reshape else ""
        return f'  {{ name: {json.dumps(t.name)} data_type: {t.dtype} dims: [ {", ".join(map(str, t.dims))} ]{reshape} }}'

    def block(kind: str, tensors) -> str:
        return f"{kind} [\n" + ",\n".join(entry(t) for t in tensors) + "\n]"

    lines = [f"name: {json.dumps(name)}", *header, f"max_batch_size: {max_batch_size}",
             block("input", inputs), block("output", outputs),
             f"instance_group [ {{ kind: {'KIND_GPU' if device == 'cuda' else 'KIND_CPU'} count: 1 }} ]"]
    if max_batch_size:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


_PYTHON_MODEL = '''"""Triton Inference Server Python-backend model: runs the blade artifact beside this file."""
import os

import torch
import triton_python_backend_utils as pb_utils

import blade


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "{artifact}")
        self.model = blade.load(path)
        self.inputs = [(node.name, node.val.device) for node in self.model.graph.inputs]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                given = {{name: torch.from_numpy(pb_utils.get_input_tensor_by_name(request, name).as_numpy().copy())
                          .to(device) for name, device in self.inputs}}
                outputs = self.model.run_named(given)
                tensors = [pb_utils.Tensor(f"output_{{i}}", out.detach().cpu().numpy())
                           for i, out in enumerate(outputs)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:  # one bad request answers with its error; the others still run
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses
'''
