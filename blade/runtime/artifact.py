"""Artifacts: a directory of data plus a manifest of hashes — saved and loaded without pickle."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from blade import __version__, backends
from blade.backends.base import Executable
from blade.runtime.compiled import CompiledModel
from blade.errors import ArtifactError, BladeError
from blade.runtime.fingerprint import path_digest
from blade.ir.graph import Graph
from blade.perf.report import CompileReport
from blade.ir.serialize import format_of, graph_from_json, graph_to_json, meta_to_json
from blade.frontend.signature import Signature
from blade.target import Target, detect

FORMAT = "blade-artifact"
FORMAT_VERSION = 2  # 2: the graph mutates, keeps state or nests graphs; an artifact without them is written as 1
MANIFEST = "manifest.json"
GRAPH = "graph.json"
WEIGHTS = "weights.safetensors"
EXAMPLES = "examples.safetensors"
BACKEND_DIR = "backend"


def _sha256_all(paths: list[Path]) -> list[str]:
    """sha256 of each file, two at a time (hashlib releases the GIL: weights and the ONNX model hash together)."""
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(path_digest, paths))


def _canonical(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _dedupe_constants(graph: Graph) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each distinct tensor once (tied weights share storage), and which names alias which."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in graph.constants.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if key in seen and tensor.numel():
            aliases[name] = seen[key]
        else:
            seen[key] = name
            stored[name] = tensor.detach().cpu().contiguous()
    return stored, aliases


def _io_spec(graph: Graph) -> dict:
    writes = dict(zip(range(graph.user_output_count, len(graph.outputs)), graph.mutations))
    return {"inputs": [{"name": n.name, **meta_to_json(n.val), **({"state": n.meta.get("source") or n.name}
                                                                  if n.name in graph.state else {})}
                       for n in graph.inputs],
            "outputs": [{**(meta_to_json(o.val) if hasattr(o, "val") else {"literal": o}),
                         **({"writes": writes[i]} if i in writes else {})} for i, o in enumerate(graph.outputs)],
            "dims": {r.name: [r.min, r.max] for r in graph.dims.values()}}


def save(compiled: CompiledModel, path, *, external: frozenset[str] = frozenset()) -> Path:
    """Write `compiled` to the directory `path` (created; an existing artifact there is replaced).

    Constants (or state) named in `external` are not written: a bundle that holds them once for several
    programs (a blade.llm artifact) passes them to `load`; the manifest lists their names."""
    root = Path(path)
    if root.exists() and not (root / MANIFEST).exists() and any(root.iterdir()):
        raise ArtifactError(f"{root} exists and is not a blade artifact; choose a new path")
    root.mkdir(parents=True, exist_ok=True)
    stored, aliases = _dedupe_constants(compiled.graph)
    unknown = set(external) - set(compiled.graph.constants) - set(compiled.graph.state)
    if unknown:
        raise ArtifactError(f"external tensors {sorted(unknown)} are neither constants nor state of "
                            f"{compiled.graph.name}")
    stored = {n: t for n, t in stored.items() if n not in external}
    aliases = {n: source for n, source in aliases.items() if n not in external}
    if any(source in external for source in aliases.values()):
        raise ArtifactError("a constant aliases an external one; pass every name of that tensor as external")
    stored.update({name: t.detach().cpu().contiguous() for name, t in compiled.graph.state.items()
                   if name not in external})
    (root / GRAPH).write_text(json.dumps(graph_to_json(compiled.graph), indent=1))
    safetensors.torch.save_file(stored, root / WEIGHTS)
    examples = {n.name: t.detach().cpu().contiguous() for n, t in zip(compiled.graph.user_inputs,
                                                                       compiled.example_inputs)}
    safetensors.torch.save_file(examples, root / EXAMPLES)
    (root / BACKEND_DIR).mkdir(exist_ok=True)
    compiled.executable.save(str(root / BACKEND_DIR))
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format": FORMAT,
        "format_version": format_of(compiled.graph),
        "blade_version": __version__,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "safetensors": safetensors.__version__},
        "backend": compiled.backend,
        "target": compiled.target.as_dict(),
        # what of the target the backend's output depends on; nothing means it runs on any machine of the device kind
        "requires": _requirements(compiled.executable),
        "io": _io_spec(compiled.graph),
        "signature": compiled.signature.as_dict(),
        "constant_aliases": aliases,
        **({"external_constants": sorted(external)} if external else {}),
        "report": compiled.report.as_dict(),
        "files": {p.relative_to(root).as_posix(): digest for p, digest in zip(files, _sha256_all(files))},
    }
    (root / MANIFEST).write_text(json.dumps(sealed(manifest, "manifest_sha256"), indent=2, sort_keys=True))
    return root


def sealed(data: dict, key: str) -> dict:
    """`data` with its own sha256 (of its canonical JSON) under `key`: a manifest that shows later edits."""
    return {**data, key: hashlib.sha256(_canonical(data)).hexdigest()}


def read_json_object(file: Path, format_name: str, what: str) -> dict:
    """The JSON object in `file` whose "format" is `format_name`; ArtifactError naming the file otherwise."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{file} is not valid JSON ({exc}); the artifact is damaged") from None
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise ArtifactError(f"{file} is not a {what}")
    return data


def check_seal(data: dict, key: str, file: Path) -> dict:
    """`data` without its seal (`key`), after checking the seal matches (see `sealed`)."""
    claimed = data.pop(key, None)
    if claimed != hashlib.sha256(_canonical(data)).hexdigest():
        raise ArtifactError(f"{file} was modified after it was written (its hash does not match); "
                            "refusing to load — recompile or restore the original artifact")
    return data


def read_manifest(path) -> dict:
    """The manifest of the artifact at `path`, after checking its own hash and its format."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{root} is not a blade artifact: {MANIFEST} is missing")
    manifest = read_json_object(manifest_path, FORMAT, "blade manifest")
    version = manifest.get("format_version")
    # checked before the hash: a newer format may hash differently, and its version is the useful message
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ArtifactError(f"{manifest_path}: artifact format version {version} is newer than this blade "
                            f"{__version__} reads (up to {FORMAT_VERSION}); upgrade blade, or recompile with this one")
    check_seal(manifest, "manifest_sha256", manifest_path)
    if version not in (1, FORMAT_VERSION):
        raise ArtifactError(f"{manifest_path}: artifact format version {version!r} is not supported by "
                            f"blade {__version__} (reads {FORMAT_VERSION}); recompile with this blade")
    return manifest


def _safe_file(root: Path, relpath: str) -> Path:
    """The file `relpath` names inside the artifact: no absolute paths, no '..', no symlinks."""
    parts = Path(relpath).parts
    if Path(relpath).is_absolute() or ".." in parts or not parts:
        raise ArtifactError(f"manifest lists {relpath!r}, which is outside the artifact; refusing to load")
    file = root / relpath
    for step in [root.joinpath(*parts[:i + 1]) for i in range(len(parts))]:
        if step.is_symlink():
            raise ArtifactError(f"artifact file {relpath} is a symbolic link; refusing to load")
    return file


def verify_files(root: Path, manifest: dict) -> None:
    """Every file the artifact needs is listed, inside it, a plain file, and matches its sha256."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError("manifest has no 'files' table; the artifact is damaged")
    missing = [name for name in (GRAPH, WEIGHTS, EXAMPLES) if name not in files]
    unexpected = [name for name in files if name not in (GRAPH, WEIGHTS, EXAMPLES)
                  and not name.startswith(f"{BACKEND_DIR}/")]
    if missing or unexpected:
        raise ArtifactError(f"manifest lists the wrong files (missing {missing}, unexpected {unexpected}); "
                            "the artifact is damaged")
    paths = []
    for relpath in files:
        file = _safe_file(root, relpath)
        if not file.is_file():
            raise ArtifactError(f"artifact file {relpath} is missing from {root}")
        paths.append(file)
    for (relpath, digest), actual in zip(files.items(), _sha256_all(paths)):
        if actual != digest:
            raise ArtifactError(f"artifact file {relpath} does not match its sha256 in the manifest: it was "
                                "modified or damaged; refusing to load")


def _check_versions(manifest: dict) -> None:
    saved_major = str(manifest.get("blade_version", "")).split(".")[0]
    if saved_major != __version__.split(".")[0]:
        raise ArtifactError(f"artifact written by blade {manifest.get('blade_version')}, this is blade "
                            f"{__version__}; recompile it with this version")
    saved_torch = manifest["versions"].get("torch", "")
    if saved_torch.split("+")[0].split(".")[:2] != torch.__version__.split("+")[0].split(".")[:2]:
        warnings.warn(f"artifact compiled with torch {saved_torch}, running torch {torch.__version__}; "
                      "every operator is checked as the graph loads", stacklevel=3)


def _requirements(executable: Executable) -> dict:
    """The target properties an executable's code depends on (its `requires()`), as JSON: {} when portable."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in executable.requires().items()
            if value}


def _check_target(saved: Target, requires: dict) -> Target:
    """This machine's target, if the artifact can run here: same device kind, and what the backend requires."""
    if saved.device == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"artifact was compiled for {saved.describe()}, but this machine has no CUDA GPU "
                            f"({detect('cpu').describe()}); recompile it for the CPU")
    here = detect(saved.device)
    if not isinstance(requires, dict):
        raise ArtifactError("manifest field 'requires' is not a table; the artifact is damaged")
    wrong_arch = requires.get("arch") not in (None, here.arch)
    missing = [f for f in requires.get("features", []) if f not in here.features]
    if wrong_arch or missing:
        why = f"it needs {requires['arch']}" if wrong_arch else f"it needs CPU features {missing}"
        raise ArtifactError(f"artifact was compiled for {saved.describe()} and this machine is {here.describe()}: "
                            f"{why}, which this machine lacks; recompile it here (or compile a portable "
                            "backend such as onnxruntime)")
    return here


def load(path, *, trusted_namespaces: tuple[str, ...] = (),
         external: dict[str, torch.Tensor] | None = None) -> CompiledModel:
    """Load an artifact written by CompiledModel.save: hashes and versions are checked first.

    The graph may call aten/prims/blade operators; name other (custom) operator namespaces in
    `trusted_namespaces` after importing the library that registers them. `external` gives the constants the
    artifact was saved without (see `save`), by name.
    """
    root = Path(path)
    manifest = read_manifest(root)
    verify_files(root, manifest)
    _check_versions(manifest)
    target = _check_target(Target.from_dict(manifest["target"]), manifest.get("requires", {}))
    try:
        constants = safetensors.torch.load_file(root / WEIGHTS)
        examples = safetensors.torch.load_file(root / EXAMPLES)
    except Exception as exc:
        raise ArtifactError(f"could not read the tensors of {root}: {exc}") from exc
    wanted = manifest.get("external_constants", [])
    missing = [n for n in wanted if n not in (external or {})]
    if missing:
        raise ArtifactError(f"{root} was saved without {len(missing)} constants that the bundle it belongs to holds "
                            f"(e.g. {missing[0]}); load the bundle (a blade.llm artifact: blade.llm.load)")
    constants.update({n: external[n] for n in wanted})
    for name, source in manifest.get("constant_aliases", {}).items():
        if source not in constants:
            raise ArtifactError(f"constant {name} is stored as {source}, which the weights file lacks")
        constants[name] = constants[source]
    try:
        graph = graph_from_json(json.loads((root / GRAPH).read_text()), constants, tuple(trusted_namespaces))
    except BladeError:
        raise
    except Exception as exc:
        raise ArtifactError(f"{root / GRAPH} could not be read back as a graph: {exc}") from exc
    backend = backends.get(manifest["backend"])
    executable = backend.load(str(root / BACKEND_DIR), graph, target)
    report = CompileReport.from_dict(manifest.get("report", {"model": graph.name}))
    example_inputs = [examples[n.name] for n in graph.inputs if n.name in examples]
    return CompiledModel(graph, executable, backend.name, target, Signature.from_dict(manifest["signature"]),
                         report, example_inputs)
