"""A CompiledLM on disk: its decode and prefill programs as blade artifacts, the weights once (in the decode
artifact; the prefill artifact names the constants it shares with it), the KV cache not at all (its shapes: it is
allocated zeroed at load), and lm.json: the settings and the hashes of both manifests, itself hashed. Saved and
loaded without pickle and without the model's code."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from blade import __version__
from blade.errors import ArtifactError

FORMAT = "blade-lm"
FORMAT_VERSION = 1
LM_MANIFEST = "lm.json"
PROGRAMS = ("decode", "prefill")


def _storage_key(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


def save(lm, path) -> Path:
    """Write `lm` (a CompiledLM) to the directory `path`; load it with blade.llm.load."""
    from blade.runtime.artifact import MANIFEST, save as save_artifact, sealed

    root = Path(path)
    if root.exists() and not (root / LM_MANIFEST).exists() and any(root.iterdir()):
        raise ArtifactError(f"{root} exists and is not a blade.llm artifact; choose a new path")
    root.mkdir(parents=True, exist_ok=True)
    decode, prefill = lm.decode_program, lm.prefill_program
    held = {}
    for name, tensor in decode.graph.constants.items():
        held.setdefault(_storage_key(tensor), name)
    links = {name: held[_storage_key(t)] for name, t in prefill.graph.constants.items() if _storage_key(t) in held}
    cache = frozenset(lm.cache)
    save_artifact(decode, root / "decode", external=cache)
    save_artifact(prefill, root / "prefill", external=frozenset(links) | cache)
    data = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "blade_version": __version__, "name": lm.name,
        "max_batch": lm.max_batch, "max_length": lm.max_length, "eos_token_ids": list(lm.eos_token_ids),
        "pad_token_id": lm.pad_token_id, "shared_constants": links,
        "cache": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in lm.cache.items()},
        "manifests": {p: hashlib.sha256((root / p / MANIFEST).read_bytes()).hexdigest() for p in PROGRAMS},
    }
    (root / LM_MANIFEST).write_text(json.dumps(sealed(data, "lm_sha256"), indent=1, sort_keys=True))
    return root


def read_lm_manifest(path) -> dict:
    """lm.json of the artifact at `path`, after checking its own hash, its format and both programs' manifests."""
    from blade.runtime.artifact import MANIFEST, check_seal, read_json_object

    root = Path(path)
    file = root / LM_MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{root} is not a blade.llm artifact: {LM_MANIFEST} is missing (a blade artifact of one "
                            "program loads with blade.load)")
    data = read_json_object(file, FORMAT, "blade.llm manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{file}: format version {data.get('format_version')!r}; this blade {__version__} reads "
                            f"{FORMAT_VERSION}; recompile with this blade")
    check_seal(data, "lm_sha256", file)
    for program in PROGRAMS:
        manifest = root / program / MANIFEST
        if not manifest.is_file() or hashlib.sha256(manifest.read_bytes()).hexdigest() != data["manifests"][program]:
            raise ArtifactError(f"{root / program} is not the {program} program this artifact was saved with "
                                "(its manifest is missing or differs); refusing to load")
    return data


def _zeroed_cache(spec, root: Path) -> dict[str, torch.Tensor]:
    """The KV cache lm.json describes, allocated and zeroed."""
    cache = {}
    for name, entry in spec.items():
        shape, dtype = entry.get("shape"), getattr(torch, str(entry.get("dtype")), None)
        if (not isinstance(dtype, torch.dtype) or not isinstance(shape, list)
                or not all(isinstance(d, int) and d > 0 for d in shape)):
            raise ArtifactError(f"{root / LM_MANIFEST}: cache entry {name} is not a shape and dtype; damaged")
        cache[name] = torch.zeros(shape, dtype=dtype)
    return cache


def load(path):
    """The CompiledLM saved at `path` (hashes checked; no pickle, no model code); its KV cache starts zeroed. A decode
    program on inductor_step compiles here (seconds), as in blade.llm.compile."""
    from blade.llm.compiled import CompiledLM, compile_decode_shapes, streamed_bytes
    from blade.runtime.artifact import load as load_artifact

    root = Path(path)
    data = read_lm_manifest(root)
    shared = _zeroed_cache(data["cache"], root)
    decode = load_artifact(root / "decode", external=shared)
    links = data["shared_constants"]
    absent = sorted(set(links.values()) - set(decode.graph.constants))
    if absent:
        raise ArtifactError(f"the decode program lacks constants {absent[:3]} the prefill program shares; the "
                            "artifact is damaged")
    prefill = load_artifact(root / "prefill", external={**shared, **{p: decode.graph.constants[d]
                                                                      for p, d in links.items()}})
    for program in (prefill, decode):
        if set(program.graph.state) != set(shared) or any(program.graph.state[n] is not t for n, t in shared.items()):
            raise ArtifactError(f"the prefill and decode programs of {root} keep other state than its cache; damaged")
    compile_decode_shapes(decode, data["max_batch"])  # Inductor's code is not saved: it compiles now
    return CompiledLM(prefill, decode, shared, max_batch=data["max_batch"], max_length=data["max_length"],
                      eos_token_ids=tuple(data["eos_token_ids"]), pad_token_id=data["pad_token_id"],
                      weight_bytes=streamed_bytes(decode.graph), name=data["name"])
