"""Seeded random damage to a saved artifact: every case is refused naming the file, or loads exactly."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

import blade
import blade.models as zoo
from blade.errors import BladeError

CASES = 500
KINDS = ("flip", "truncate", "delete", "extra", "manifest_field", "traversal", "link_out")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """zoo bert tiny on the onnxruntime backend: graph, weights, examples, ONNX model and its data."""
    model, example, dims = zoo.get("bert")
    cm = blade.compile(model, example, dynamic_shapes=dims, backend="onnxruntime")
    root = tmp_path_factory.mktemp("fuzz")
    base = root / "bert.blade"
    cm.save(base)
    outside = root / "outside.txt"
    outside.write_text("not part of any artifact")
    files = sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
    return base, outside, files, cm.run_flat(cm.example_inputs)


def damage(work: Path, files: list[str], outside: Path, rng: random.Random) -> tuple[str, str]:
    """Apply one random corruption in place; (kind, the file it touched)."""
    kind, name = rng.choice(KINDS), rng.choice(files)
    path = work / name
    if kind == "flip":
        data = bytearray(path.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        path.write_bytes(path.read_bytes()[: rng.randrange(path.stat().st_size)])
    elif kind == "delete":
        path.unlink()
    elif kind == "extra":
        name = rng.choice(["notes.txt", "backend/region_9.onnx", "weights.safetensors.bak"])
        (work / name).write_bytes(os.urandom(rng.randrange(1, 256)))
    elif kind == "manifest_field":
        name = "manifest.json"
        manifest = json.loads((work / name).read_text())
        manifest[rng.choice(sorted(manifest))] = rng.choice([None, 0, -1, "x", [], {}, 10 ** 12, "../x"])
        (work / name).write_text(json.dumps(manifest))
    elif kind == "traversal":
        text = (work / "manifest.json").read_text()
        target = rng.choice(["../../outside.txt", "/etc/passwd", "backend/../../outside.txt"])
        (work / "manifest.json").write_text(text.replace(json.dumps(name), json.dumps(target), 1))
    elif kind == "link_out":
        path.unlink()
        path.symlink_to(outside)
    return kind, name


def test_random_damage_is_refused_naming_the_file_or_loads_exactly(artifact, tmp_path):
    base, outside, files, reference = artifact
    before = outside.read_bytes()
    rng = random.Random(20261126)
    seen: dict[str, int] = {}
    for case in range(CASES):
        work = tmp_path / f"case{case % 2}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(base, work, symlinks=True)
        kind, name = damage(work, files, outside, rng)
        try:
            loaded = blade.load(work)
            outputs = loaded.run_flat(loaded.example_inputs)
        except BladeError as exc:
            seen[f"{kind}: refused"] = seen.get(f"{kind}: refused", 0) + 1
            named = Path(name).name in str(exc) or "manifest" in str(exc)
            assert named, f"case {case} ({kind} {name}): the error does not name the file: {exc}"
            continue
        # only damage that changes nothing the artifact relies on may load, and then exactly
        assert all(torch.equal(o, r) for o, r in zip(outputs, reference)), f"case {case} ({kind} {name}): wrong output"
        seen[f"{kind}: loaded"] = seen.get(f"{kind}: loaded", 0) + 1
    assert outside.read_bytes() == before  # nothing written outside the artifact
    for kind in ("flip", "truncate", "delete", "link_out", "manifest_field"):
        assert seen.get(f"{kind}: refused", 0) > 0 and not seen.get(f"{kind}: loaded"), seen
