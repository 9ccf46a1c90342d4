"""Artifacts: save → load in a fresh process without the model's code; tampering is refused."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from torch.export import Dim

import blade
from blade.target import detect
import blade.models as zoo
from blade.runtime.artifact import _canonical
from blade.errors import ArtifactError

from helpers import assert_matches


class Encoder(torch.nn.Module):
    """Lives only in this test file: a fresh process cannot import it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16)
        self.layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)

    def forward(self, ids, mask):
        hidden = self.layer(self.embed(ids)) * mask.unsqueeze(-1)
        return {"hidden": hidden, "pooled": (hidden.mean(1), hidden.amax(1))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = Encoder().eval()
    batch, seq = Dim("batch", min=1, max=8), Dim("seq", min=2, max=32)
    example = (torch.randint(0, 50, (2, 5)), torch.ones(2, 5))
    cm = blade.compile(model, example, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), backend="eager")
    path = tmp_path_factory.mktemp("art") / "encoder.blade"
    cm.save(path)
    return model, cm, path


FRESH_PROCESS = textwrap.dedent("""
    import sys, safetensors.torch, blade
    cm = blade.load(sys.argv[1])
    inputs = safetensors.torch.load_file(sys.argv[2])
    out = cm(inputs["ids"], inputs["mask"])
    safetensors.torch.save_file({"hidden": out["hidden"], "mean": out["pooled"][0], "max": out["pooled"][1]},
                                sys.argv[3])
    assert not any(m.startswith(("blade.models", "test_")) for m in sys.modules), "model code was imported"
    print(type(out).__name__, type(out["pooled"]).__name__, cm.report.accuracy.ok)
""")


def test_load_in_a_fresh_process_reproduces_outputs(saved, tmp_path):
    model, _, path = saved
    ids, mask = torch.randint(0, 50, (3, 11)), (torch.rand(3, 11) > 0.3).float()
    safetensors.torch.save_file({"ids": ids, "mask": mask}, tmp_path / "in.safetensors")
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(path), str(tmp_path / "in.safetensors"),
                             str(tmp_path / "out.safetensors")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["dict", "tuple", "True"]
    out = safetensors.torch.load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        ref = model(ids, mask)
    assert_matches({"hidden": out["hidden"], "pooled": (out["mean"], out["max"])}, ref)


def test_load_in_process_keeps_structure_and_report(saved):
    _, cm, path = saved
    loaded = blade.load(path)
    ids, mask = torch.randint(0, 50, (4, 9)), torch.ones(4, 9)
    assert_matches(loaded(ids, mask), cm(ids, mask), tol=0)
    assert loaded.report.as_dict() == cm.report.as_dict()
    assert str(loaded.graph) == str(cm.graph)
    with pytest.raises(blade.errors.ShapeError, match="'seq'"):
        loaded(torch.randint(0, 50, (4, 40)), torch.ones(4, 40))


def _copy(path, tmp_path):
    import shutil

    target = tmp_path / "copy.blade"
    shutil.copytree(path, target)
    return target


def _rewrite_manifest(path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("manifest_sha256")
    change(manifest)
    manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_weights_are_refused(saved, tmp_path):
    path = _copy(saved[2], tmp_path)
    data = bytearray((path / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.safetensors does not match its sha256"):
        blade.load(path)


def test_tampered_manifest_is_refused(saved, tmp_path):
    path = _copy(saved[2], tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["io"]["dims"]["seq"] = [2, 4096]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest.json was modified after it was written"):
        blade.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="is not valid JSON"):
        blade.load(path)


def test_tampered_graph_is_refused_even_with_a_matching_manifest(saved, tmp_path):
    path = _copy(saved[2], tmp_path)
    graph = json.loads((path / "graph.json").read_text())
    graph["nodes"][-1]["target"] = "builtins.eval"
    (path / "graph.json").write_text(json.dumps(graph))
    digest = hashlib.sha256((path / "graph.json").read_bytes()).hexdigest()
    _rewrite_manifest(path, lambda m: m["files"].__setitem__("graph.json", digest))
    with pytest.raises(ArtifactError, match="builtins.eval"):
        blade.load(path)


def test_missing_file_version_and_target_mismatch(saved, tmp_path):
    path = _copy(saved[2], tmp_path)
    (path / "examples.safetensors").unlink()
    with pytest.raises(ArtifactError, match="examples.safetensors is missing"):
        blade.load(path)
    path = _copy(saved[2], tmp_path / "b")
    _rewrite_manifest(path, lambda m: m.__setitem__("format_version", 99))
    with pytest.raises(ArtifactError, match="format version 99 is newer than this blade .* reads \\(up to 2\\)"):
        blade.load(path)
    # a newer format is named even when it hashes its manifest differently
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["manifest_sha256"] = "computed some other way"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 99 is newer"):
        blade.load(path)
    path = _copy(saved[2], tmp_path / "old")
    _rewrite_manifest(path, lambda m: m.__setitem__("format_version", 0))
    with pytest.raises(ArtifactError, match="format version 0 is not supported"):
        blade.load(path)
    if not torch.cuda.is_available():
        path = _copy(saved[2], tmp_path / "c")
        _rewrite_manifest(path, lambda m: m["target"].update(device="cuda", name="NVIDIA H100"))
        with pytest.raises(ArtifactError, match="compiled for cuda NVIDIA H100.*no CUDA GPU"):
            blade.load(path)


def test_portable_artifact_loads_on_another_cpu_of_the_same_kind(saved, tmp_path):
    path = _copy(saved[2], tmp_path)
    assert json.loads((path / "manifest.json").read_text())["requires"] == {}, "eager artifacts need nothing"
    _rewrite_manifest(path, lambda m: m["target"].update(name="Some Other CPU", features=["avx2"]))
    loaded = blade.load(path)
    example = saved[1].example_inputs
    torch.testing.assert_close(loaded.run_flat(example), saved[1].run_flat(example), rtol=0, atol=0)


def test_artifact_for_another_target_is_refused_naming_both(saved, tmp_path):
    here = detect("cpu")
    path = _copy(saved[2], tmp_path)
    _rewrite_manifest(path, lambda m: (m["target"].update(name="Intel Xeon Sapphire Rapids",
                                                          features=["avx512f", "amx_tile", "amx_bf16"]),
                                       m.__setitem__("requires", {"features": ["amx_bf16", "not_a_real_flag"]})))
    with pytest.raises(ArtifactError) as info:
        blade.load(path)
    text = str(info.value)
    assert "compiled for cpu Intel Xeon Sapphire Rapids" in text and here.describe() in text
    assert "not_a_real_flag" in text and "recompile it here" in text
    path = _copy(saved[2], tmp_path / "arch")
    _rewrite_manifest(path, lambda m: m.__setitem__("requires", {"arch": "riscv64"}))
    with pytest.raises(ArtifactError, match=f"it needs riscv64, which this machine lacks.*") as info:
        blade.load(path)
    assert here.arch in str(info.value)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        blade.load(tmp_path)


def test_tied_weights_are_stored_once(tmp_path):
    model, example_inputs, dynamic_shapes = zoo.get("gpt")
    # optimize=0: cleanup would drop the second (unread) placeholder of the tied weight
    cm = blade.compile(model, example_inputs, dynamic_shapes=dynamic_shapes, optimize=0, backend="eager")
    cm.save(tmp_path / "gpt.blade")
    manifest = json.loads((tmp_path / "gpt.blade" / "manifest.json").read_text())
    assert manifest["constant_aliases"], "the tied embedding / lm_head weight should be stored once"
    loaded = blade.load(tmp_path / "gpt.blade")
    for alias, source in manifest["constant_aliases"].items():
        assert loaded.graph.constants[alias].data_ptr() == loaded.graph.constants[source].data_ptr()
    ids = zoo.sample_inputs("gpt", seed=4, batch=2, seq=9)
    assert_matches(loaded(*ids), cm(*ids), tol=0)


def _edit_graph(path, change) -> None:
    """Rewrite graph.json and re-sign everything, as a forger who knows the format would."""
    graph = json.loads((path / "graph.json").read_text())
    change(graph)
    (path / "graph.json").write_text(json.dumps(graph))
    digest = hashlib.sha256((path / "graph.json").read_bytes()).hexdigest()
    _rewrite_manifest(path, lambda m: m["files"].__setitem__("graph.json", digest))


@pytest.mark.parametrize("target, message", [
    ("import_module.__self__.load_library", "not a torch operator blade may load"),
    ("aten.__class__.__init__", "not a torch operator blade may load"),
    ("aten.copy_.default", "writes memory or reads files"),
    ("aten.from_file.default", "writes memory or reads files"),
])
def test_forged_graph_cannot_reach_code_or_files(saved, tmp_path, target, message):
    path = _copy(saved[2], tmp_path)
    _edit_graph(path, lambda g: g["nodes"][-1].__setitem__("target", target))
    with pytest.raises(ArtifactError, match=message):
        blade.load(path)


def test_forged_output_structure_never_calls_arbitrary_classes(saved, tmp_path):
    path = _copy(saved[2], tmp_path)
    popen = {"kind": "namedtuple", "class": "subprocess.Popen", "fields": ["args"], "children": [{"kind": "leaf"}]}
    _rewrite_manifest(path, lambda m: m["signature"].__setitem__("out_tree", popen))
    _edit_graph(path, lambda g: g.__setitem__("outputs", [["touch", str(tmp_path / "pwned")]]))
    with pytest.raises(ArtifactError, match="outputs are tensors or numbers"):
        blade.load(path)
    path = _copy(saved[2], tmp_path / "b")
    _rewrite_manifest(path, lambda m: m["signature"].__setitem__(
        "out_tree", {**popen, "children": [{"kind": "leaf"}, {"kind": "leaf"}, {"kind": "leaf"}]}))
    out = blade.load(path)(torch.randint(0, 50, (2, 5)), torch.ones(2, 5))
    assert isinstance(out, dict) and not (tmp_path / "pwned").exists()


def test_manifest_cannot_point_outside_or_through_links(saved, tmp_path):
    path = _copy(saved[2], tmp_path)
    _rewrite_manifest(path, lambda m: m["files"].__setitem__("backend/../../../etc/passwd", "0" * 64))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        blade.load(path)
    path = _copy(saved[2], tmp_path / "b")
    _rewrite_manifest(path, lambda m: m.__setitem__("files", {}))
    with pytest.raises(ArtifactError, match="lists the wrong files"):
        blade.load(path)
    path = _copy(saved[2], tmp_path / "c")
    (path / "weights.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (path / "weights.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ArtifactError, match="symbolic link"):
        blade.load(path)


def test_weights_must_match_the_graph(saved, tmp_path):
    path = _copy(saved[2], tmp_path)
    weights = safetensors.torch.load_file(path / "weights.safetensors")
    name = next(k for k, v in weights.items() if v.dim() == 1)
    weights[name] = torch.zeros(1)
    safetensors.torch.save_file(weights, path / "weights.safetensors")
    digest = hashlib.sha256((path / "weights.safetensors").read_bytes()).hexdigest()
    _rewrite_manifest(path, lambda m: m["files"].__setitem__("weights.safetensors", digest))
    with pytest.raises(ArtifactError, match=f"holds {name} as torch.float32\\[1\\]"):
        blade.load(path)


class KeyedOutputs(torch.nn.Module):
    def forward(self, x):
        return {("a", 1): x + 1, 2: x * 2}


def test_dict_keys_survive_the_round_trip(tmp_path):
    x = torch.randn(3)
    blade.compile(KeyedOutputs(), (x,), backend="eager").save(tmp_path / "k.blade")
    out = blade.load(tmp_path / "k.blade")(x)
    assert set(out) == {("a", 1), 2} and torch.equal(out[2], x * 2)


def test_bitwise_mask_ops_round_trip(tmp_path):
    """aten.__and__ and friends (transformers builds causal masks with them) load back; other dunders do not."""
    class Masked(torch.nn.Module):
        def forward(self, a, b):
            return torch.where((a > 0) & (b > 0) | (a < -1), a, b)

    a, b = torch.randn(4, 5), torch.randn(4, 5)
    cm = blade.compile(Masked(), (a, b), backend="eager", optimize=0)
    assert any("__and__" in op for op in cm.graph.count_targets())
    cm.save(tmp_path / "masked.blade")
    torch.testing.assert_close(blade.load(tmp_path / "masked.blade")(a, b), Masked()(a, b))
    from blade.ir.serialize import target_from_json
    for name in ("aten.__class__.default", "aten.__getattr__.default", "aten.__dict__.default"):
        with pytest.raises(ArtifactError, match="not a torch operator blade may load"):
            target_from_json(name)
