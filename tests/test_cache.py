"""The compile cache: hits across processes, misses on every change that matters, damaged entries,
concurrent writers, the size limit, and `blade cache list|clear`."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import blade
import blade.models as zoo
from blade import cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BLADE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BLADE_CACHE", "1")
    monkeypatch.delenv("BLADE_CACHE_MAX_GB", raising=False)
    return tmp_path / "cache" / "compiled"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "blade", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def _rel_err(got, want):
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))


def test_second_compile_in_a_new_process_is_a_hit(cache_dir, tmp_path):
    first = _cli("compile", "blade.models.bert:tiny", "--backend", "onnxruntime", "-o", str(tmp_path / "a"), "--json")
    assert first.returncode == 0, first.stderr
    miss = json.loads(first.stdout)["report"]["cache"]
    assert miss["hit"] is False and miss["stored"] == "stored" and miss["keyed_by"] == "source"
    second = _cli("compile", "blade.models.bert:tiny", "--backend", "onnxruntime", "-o", str(tmp_path / "b"), "--json")
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)["report"]
    assert report["cache"]["hit"] is True and report["cache"]["key"] == miss["key"]
    assert set(report["seconds"]) == {"cache_key", "cache_load", "total"}
    assert report["accuracy"]["ok"], "the hit keeps the accuracy check of the compile it reuses"
    model, example, _ = zoo.get("bert")
    with torch.no_grad():
        want = model(*example)
    got = blade.load(tmp_path / "b")(*example)
    assert _rel_err(got[0], want[0]) < 1e-4
    off = _cli("compile", "blade.models.bert:tiny", "--backend", "onnxruntime", "-o", str(tmp_path / "c"), "--json",
               "--no-cache")
    assert json.loads(off.stdout)["report"]["cache"] == {}


def test_every_change_that_matters_misses(cache_dir):
    model, example, dynamic = zoo.get("bert")
    key = blade.compile(model, example, dynamic_shapes=dynamic, backend="eager").report.cache["key"]
    hit = blade.compile(model, example, dynamic_shapes=dynamic, backend="eager")
    assert hit.report.cache == {**hit.report.cache, "hit": True, "key": key}

    def key_of(*args, **kwargs):
        return blade.compile(*args, **kwargs).report.cache["key"]

    assert key_of(model, example, dynamic_shapes=dynamic, backend="onnxruntime") != key
    assert key_of(model, example, dynamic_shapes=dynamic, backend="eager", optimize=1) != key
    longer = zoo.sample_inputs("bert", batch=2, seq=example[0].shape[1] + 3)
    assert key_of(model, longer, dynamic_shapes=dynamic, backend="eager") != key, "input shapes are in the key"
    assert key_of(model, example, backend="eager") != key, "so are the dynamic shapes"
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    norm.eps = 1e-3  # a plain attribute
    changed = blade.compile(model, example, dynamic_shapes=dynamic, backend="eager")
    assert changed.report.cache["hit"] is False and changed.report.cache["key"] != key
    norm.eps = 1e-12
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0  # one weight, in place
    changed = blade.compile(model, example, dynamic_shapes=dynamic, backend="eager")
    assert changed.report.cache["hit"] is False
    with torch.no_grad():
        want = model(*example)
    assert _rel_err(changed(*example)[0], want[0]) < 1e-5, "the new weights are compiled, not the cached ones"


def test_an_edit_to_the_model_source_misses(cache_dir, tmp_path, monkeypatch):
    source = tmp_path / "user_model.py"
    source.write_text(textwrap.dedent("""
        import torch
        class Scale(torch.nn.Module):
            def forward(self, x):
                return torch.relu(x) * 2.0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import user_model

    x = torch.randn(3, 4)
    first = blade.compile(user_model.Scale(), (x,), backend="eager")
    assert first.report.cache["hit"] is False
    assert blade.compile(user_model.Scale(), (x,), backend="eager").report.cache["hit"] is True
    source.write_text(source.read_text().replace("* 2.0", "* 3.0"))
    os.utime(source, ns=(0, 10**9 + os.stat(source).st_mtime_ns))  # a new mtime even within one clock tick
    importlib.reload(user_model)
    edited = blade.compile(user_model.Scale(), (x,), backend="eager")
    assert edited.report.cache["hit"] is False
    torch.testing.assert_close(edited(x), torch.relu(x) * 3.0)


def test_a_hooked_module_is_keyed_by_its_captured_graph(cache_dir):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    model[0].register_forward_hook(lambda module, args, out: out * 2)
    x = torch.randn(2, 4)
    first = blade.compile(model, (x,), backend="eager")
    assert first.report.cache["keyed_by"].startswith("captured graph (submodule 0 has forward hooks)")
    second = blade.compile(model, (x,), backend="eager")
    assert second.report.cache["hit"] is True
    torch.testing.assert_close(second(x), model(x))


def test_a_damaged_entry_is_compiled_again(cache_dir):
    model, example, dynamic = zoo.get("mlp")
    key = blade.compile(model, example, dynamic_shapes=dynamic, backend="eager").report.cache["key"]
    weights = cache_dir / key / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    again = blade.compile(model, example, dynamic_shapes=dynamic, backend="eager")
    assert again.report.cache["hit"] is False and again.report.cache["stored"] == "stored"
    assert any("weights.safetensors does not match its sha256" in w for w in again.report.warnings)
    assert blade.compile(model, example, dynamic_shapes=dynamic, backend="eager").report.cache["hit"] is True


def test_failed_accuracy_is_not_cached(cache_dir, monkeypatch):
    import blade.api

    model, example, dynamic = zoo.get("mlp")
    real = blade.api.compare

    def failing(outputs, reference):  # as if the backend had computed something else
        return real([o + 1.0 for o in outputs], reference)

    monkeypatch.setattr(blade.api, "compare", failing)
    report = blade.compile(model, example, dynamic_shapes=dynamic, backend="eager").report
    assert report.cache["stored"] == "not cached: outputs differ from eager" and not cache.entries()


def test_two_processes_compiling_at_once_leave_one_valid_entry(cache_dir, tmp_path):
    env = {**os.environ, "BLADE_CACHE_DIR": str(cache_dir.parent), "BLADE_CACHE": "1"}
    command = [sys.executable, "-m", "blade", "compile", "blade.models.bert:tiny", "--backend", "onnxruntime",
               "--json", "-o"]
    runs = [subprocess.Popen(command + [str(tmp_path / f"out{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env) for i in range(2)]
    results = [(run.wait(), *run.communicate()) for run in runs]
    assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
    reports = [json.loads(out)["report"] for _, out, _ in results]
    assert len({r["cache"]["key"] for r in reports}) == 1
    assert sorted(p.name for p in cache_dir.iterdir()) == [reports[0]["cache"]["key"]], "no half-written leftovers"
    model, example, _ = zoo.get("bert")
    with torch.no_grad():
        want = model(*example)
    assert _rel_err(blade.load(cache_dir / reports[0]["cache"]["key"])(*example)[0], want[0]) < 1e-4


def test_size_limit_evicts_least_recently_used(cache_dir, monkeypatch):
    small = [torch.nn.Linear(64, 64) for _ in range(3)]
    x = torch.randn(2, 64)
    keys = [blade.compile(m, (x,), backend="eager").report.cache["key"] for m in small]
    assert [e["key"] for e in sorted(cache.entries(), key=lambda e: e["key"])] == sorted(keys)
    one = cache.entries()[0]["bytes"]
    blade.compile(small[0], (x,), backend="eager")  # entry 0 is now the most recently used
    monkeypatch.setenv("BLADE_CACHE_MAX_GB", str(2.5 * one / 1e9))
    assert cache.prune() == [keys[1]], "the least recently used entry goes first"
    assert sorted(e["key"] for e in cache.entries()) == sorted([keys[0], keys[2]])
    monkeypatch.setenv("BLADE_CACHE_MAX_GB", str(one / 2 / 1e9))
    report = blade.compile(torch.nn.Linear(64, 32), (x,), backend="eager").report
    assert report.cache["stored"].startswith("not cached:") and "over the cache limit" in report.cache["stored"]


def test_cache_cli_list_and_clear(cache_dir):
    model, example, dynamic = zoo.get("mlp")
    key = blade.compile(model, example, dynamic_shapes=dynamic, backend="eager").report.cache["key"]
    listed = _cli("cache", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)["entries"]
    assert [(e["key"], e["backend"]) for e in entries] == [(key, "eager")] and entries[0]["bytes"] > 0
    assert key in _cli("cache", "list").stdout
    cleared = _cli("cache", "clear", "--json")
    assert json.loads(cleared.stdout)["removed"] == 1 and cache.entries() == []


def test_hugging_face_model_hits_in_a_new_process(cache_dir, tmp_path):
    """transformers' configs carry per-process values (a salted str hash); the key must not see them."""
    (tmp_path / "hf_factory.py").write_text(textwrap.dedent("""
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        def tiny():
            torch.manual_seed(0)
            config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32, use_cache=False,
                                bos_token_id=0, eos_token_id=0)
            return GPT2LMHeadModel(config).eval(), (torch.randint(0, 97, (1, 8)),)
    """))
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    keys = []
    for name in ("a", "b"):
        run = _cli("compile", "hf_factory:tiny", "--backend", "eager", "-o", str(tmp_path / name), "--json", env=env)
        assert run.returncode == 0, run.stderr
        keys.append(json.loads(run.stdout)["report"]["cache"])
    assert keys[0]["hit"] is False and keys[1]["hit"] is True and keys[0]["key"] == keys[1]["key"]
