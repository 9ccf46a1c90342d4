"""Triton Inference Server model repositories from artifacts: model.onnx + config.pbtxt, or a Python-backend model."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from blade.artifact import read_manifest, verify_files
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


def export_triton_repo(artifact, repo, *, name: str | None = None, max_batch: int | None = None) -> ServingExport:
    """Write `repo/<name>/` for Triton Inference Server from the blade artifact at `artifact`.

    An onnxruntime artifact that runs in ONNX Runtime alone becomes `1/model.onnx` (platform
    onnxruntime_onnx); any other artifact becomes a Python-backend model that loads the artifact.
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
    batch_dim, notes = _batch_dim(compiled.graph)
    max_batch_size = _max_batch_size(batch_dim, compiled.graph, max_batch)
    single_onnx = compiled.backend == "onnxruntime" and _runs_in_onnxruntime_alone(compiled)
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    try:
        if single_onnx:
            compiled.executable.to_onnx(version_dir / "model.onnx")
            inputs, outputs = _onnx_tensors(version_dir / "model.onnx", compiled.graph, max_batch_size)
            header = ['platform: "onnxruntime_onnx"']
            if device == "cpu":
                notes.append("Triton's ONNX Runtime backend applies its own graph optimizations, including "
                             "SkipLayerNormFusion, which blade turns off on CPU as slower there")
        else:
            shutil.copytree(root, version_dir / ARTIFACT_DIR)
            inputs = [_tensor(n.name, n.val, max_batch_size) for n in compiled.graph.inputs]
            outputs = [_tensor(f"output_{i}", out.val, max_batch_size) for i, out in enumerate(compiled.graph.outputs)]
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


def _runs_in_onnxruntime_alone(compiled) -> bool:
    steps = getattr(compiled.executable, "steps", [])
    return len(steps) == 1 and steps[0].engine == "onnxruntime"


def _batch_dim(graph) -> tuple[str | None, list[str]]:
    """The dynamic dim that leads every input and output, which Triton can batch over, if there is one."""
    import sympy

    tensors = [n.val for n in graph.inputs] + [getattr(out, "val", None) for out in graph.outputs]
    leads = [getattr(meta, "shape", ())[:1] for meta in tensors]
    first = leads[0][0] if leads and leads[0] else None
    if not isinstance(first, sympy.Symbol) or any(lead != (first,) for lead in leads):
        return None, ["no dynamic batch: the leading dims of the inputs and outputs are not one dynamic dim, "
                      "so max_batch_size is 0 and requests carry full shapes"]
    if first.name not in graph.dims:
        return None, [f"leading dim {first} is not one of the graph's dynamic dims; max_batch_size is 0"]
    low = graph.dims[first.name].min
    if low > 1:
        return None, [f"leading dim {first} starts at {low}, but Triton batches from 1; max_batch_size is 0"]
    return first.name, []


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
    return TensorConfig(name, TRITON_DTYPES[dtype], dims[1:] if max_batch_size else dims)


def _onnx_tensors(path: Path, graph, max_batch_size: int) -> tuple[list[TensorConfig], list[TensorConfig]]:
    """The ONNX model's own input and output names with the IR's dtypes and shapes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    in_names = [value.name for value in model.graph.input]
    out_names = [value.name for value in model.graph.output]
    if in_names != [n.name for n in graph.inputs] or len(out_names) != len(graph.outputs):
        raise BackendError(f"the exported ONNX model's inputs {in_names} / {len(out_names)} outputs do not match "
                           "the artifact's graph; the artifact is damaged — recompile it")
    inputs = [_tensor(n.name, n.val, max_batch_size) for n in graph.inputs]
    outputs = [_tensor(name, out.val, max_batch_size) for name, out in zip(out_names, graph.outputs)]
    return inputs, outputs


def _config_text(name: str, header: list[str], max_batch_size: int, inputs, outputs, device: str) -> str:
    def block(kind: str, tensors) -> str:
        entries = ",\n".join(f'  {{ name: {json.dumps(t.name)} data_type: {t.dtype} dims: [ {", ".join(map(str, t.dims))} ] }}'
                             for t in tensors)
        return f"{kind} [\n{entries}\n]"

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
        self.input_names = [node.name for node in self.model.graph.inputs]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                given = {{name: torch.from_numpy(pb_utils.get_input_tensor_by_name(request, name).as_numpy().copy())
                          for name in self.input_names}}
                outputs = self.model.run_named(given)
                tensors = [pb_utils.Tensor(f"output_{{i}}", out.detach().cpu().numpy())
                           for i, out in enumerate(outputs)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:  # one bad request answers with its error; the others still run
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses
'''
