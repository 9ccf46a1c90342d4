"""The compile cache: hits across processes, misses on every change that matters, damaged entries,
concurrent writers, the size limit, and `blade cache list|clear`. Only the tests of another process's entries
start one (`python -m blade`); the rest run the CLI in this process."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import blade
import blade.models as zoo
from blade.runtime import cache
from helpers import run_cli


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


def test_two_processes_compiling_at_once_leave_one_valid_entry_that_a_third_process_hits(cache_dir, tmp_path):
    env = {**os.environ, "BLADE_CACHE_DIR": str(cache_dir.parent), "BLADE_CACHE": "1"}
    command = [sys.executable, "-m", "blade", "compile", "blade.models.bert:tiny", "--backend", "onnxruntime",
               "--json", "-o"]
    runs = [subprocess.Popen(command + [str(tmp_path / f"out{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env) for i in range(2)]
    results = [(run.wait(), *run.communicate()) for run in runs]
    assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
    reports = [json.loads(out)["report"] for _, out, _ in results]
    assert len({r["cache"]["key"] for r in reports}) == 1
    key = reports[0]["cache"]["key"]
    assert sorted(p.name for p in cache_dir.iterdir()) == [key], "no half-written leftovers"
    stored = [r["cache"] for r in reports if r["cache"].get("stored") == "stored"]
    assert len(stored) == 1 and stored[0]["hit"] is False and stored[0]["keyed_by"] == "source", reports
    model, example, _ = zoo.get("bert")
    with torch.no_grad():
        want = model(*example)
    assert _rel_err(blade.load(cache_dir / key)(*example)[0], want[0]) < 1e-4
    third = _cli("compile", "blade.models.bert:tiny", "--backend", "onnxruntime", "-o", str(tmp_path / "b"), "--json")
    assert third.returncode == 0, third.stderr
    report = json.loads(third.stdout)["report"]
    assert report["cache"]["hit"] is True and report["cache"]["key"] == key
    assert set(report["seconds"]) == {"cache_key", "cache_load", "total"}
    assert report["accuracy"]["ok"], "the hit keeps the accuracy check of the compile it reuses"
    got = blade.load(tmp_path / "b")(*example)
    assert _rel_err(got[0], want[0]) < 1e-4
    off = run_cli("compile", "blade.models.bert:tiny", "--backend", "onnxruntime", "-o", str(tmp_path / "c"),
                  "--json", "--no-cache")
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
    import blade.perf.accuracy
    import blade.api

    model, example, dynamic = zoo.get("mlp")

    class Failing(blade.perf.accuracy.Judge):  # as if every backend, eager included, computed something else
        def __call__(self, outputs):
            return super().__call__([o + 1.0 for o in outputs])

    monkeypatch.setattr(blade.driver.pipeline, "Judge", Failing)
    report = blade.compile(model, example, dynamic_shapes=dynamic, backend="eager").report
    assert report.cache["stored"] == "not cached: outputs differ from eager" and not cache.entries()


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
    listed = run_cli("cache", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)["entries"]
    assert [(e["key"], e["backend"]) for e in entries] == [(key, "eager")] and entries[0]["bytes"] > 0
    assert key in run_cli("cache", "list").stdout
    cleared = run_cli("cache", "clear", "--json")
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


def _scale(x, s=2.0):
    return x * s


class _Scaler:
    def __init__(self, factor):
        self.factor = factor

    def apply(self, x):
        return x * self.factor


def test_attribute_values_that_differ_never_share_a_key():
    import functools

    from blade.runtime.fingerprint import Unstable, stable_value

    different = [
        (functools.partial(_scale, s=2.0), functools.partial(_scale, s=3.0)),
        (_Scaler(2).apply, _Scaler(3).apply),
        (lambda x: x * 2, lambda x: x * 3),
        ({"eps": 1e-5, "act": "gelu"}, {"eps": 1e-6, "act": "gelu"}),
        (torch.ones(3), torch.zeros(3)),
    ]
    for a, b in different:
        assert stable_value(a) != stable_value(b), (a, b)

    def with_default(x, s=2.0):
        return x * s

    before = stable_value(with_default)
    with_default.__defaults__ = (3.0,)
    assert stable_value(with_default) != before
    with pytest.raises(Unstable, match="bound to a Tensor"):
        stable_value(torch.ones(2).mul)


def test_code_edited_but_not_reloaded_is_keyed_as_it_runs(cache_dir, tmp_path, monkeypatch):
    """The key follows the code the process runs, not the file on disk (notebooks edit files under a live kernel)."""
    source = tmp_path / "live_model.py"
    source.write_text("import torch\nclass Twice(torch.nn.Module):\n    def forward(self, x):\n        return x * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import live_model

    x = torch.ones(2, 2)
    source.write_text(source.read_text().replace("x * 2", "x * 3"))  # on disk only
    stale = blade.compile(live_model.Twice(), (x,), backend="eager")
    torch.testing.assert_close(stale(x), x * 2)
    importlib.reload(live_model)
    fresh = blade.compile(live_model.Twice(), (x,), backend="eager")
    assert fresh.report.cache["hit"] is False, "the reloaded code must not reuse the compile of the old code"
    torch.testing.assert_close(fresh(x), x * 3)


def test_graph_key_includes_the_output_names(cache_dir):
    class Named(torch.nn.Module):
        def __init__(self, swap):
            super().__init__()
            self.swap = swap

        def forward(self, x):
            a, b = x * 2, x + 1
            return {"hidden": a, "logits": b} if self.swap else {"logits": a, "hidden": b}

    x = torch.randn(2, 3)
    outputs = []
    for swap in (False, True):
        program = torch.export.export(Named(swap), (x,))
        cm = blade.compile(program, (x,), backend="eager")
        assert cm.report.cache["keyed_by"].startswith("captured graph")
        outputs.append(cm(x))
    torch.testing.assert_close(outputs[0]["logits"], x * 2)
    torch.testing.assert_close(outputs[1]["logits"], x + 1)


def test_default_dtype_is_in_the_key(cache_dir):
    class Ones(torch.nn.Module):
        def forward(self, x):
            return x.sum() + torch.ones(2)

    x = torch.randn(3)
    blade.compile(Ones(), (x,), backend="eager")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        again = blade.compile(Ones(), (x,), backend="eager")
        assert again.report.cache["hit"] is False and again(x).dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)


def test_concurrent_writers_and_a_reader_never_see_half_an_entry(cache_dir, monkeypatch):
    """Two writers of one key overlap inside save(); a reader during the writes sees a miss, never a partial."""
    import threading

    import blade.runtime.artifact

    model, example, dynamic = zoo.get("mlp")
    compiled = blade.compile(model, example, dynamic_shapes=dynamic, backend="eager", cache=False)
    real_save, inside, release = blade.runtime.artifact.save, threading.Barrier(2), threading.Event()

    def slow_save(cm, path):
        real_save(cm, path)
        inside.wait(timeout=30)  # both writers have written their private folder
        release.wait(timeout=30)

    monkeypatch.setattr(blade.runtime.artifact, "save", slow_save)
    results = []
    writers = [threading.Thread(target=lambda: results.append(cache.store(compiled, "k" * 40))) for _ in range(2)]
    for w in writers:
        w.start()
    import time

    deadline = time.monotonic() + 60
    while sum(1 for p in cache_dir.glob(".tmp-*")) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.load("k" * 40) == (None, "") and cache.entries() == []
    release.set()
    for w in writers:
        w.join()
    assert sorted(what for _, what in results) == ["another process cached it first", "stored"]
    assert [p.name for p in cache_dir.iterdir()] == ["k" * 40]
    loaded, problem = cache.load("k" * 40)
    assert problem == "" and torch.equal(loaded(*example), compiled(*example))


def test_a_vanishing_entry_is_a_miss_and_store_failures_keep_the_compile(cache_dir, monkeypatch):
    import blade.runtime.artifact

    model, example, dynamic = zoo.get("mlp")
    key = blade.compile(model, example, dynamic_shapes=dynamic, backend="eager").report.cache["key"]

    def vanished(path, **kwargs):
        raise FileNotFoundError(f"{path}/weights.safetensors")

    monkeypatch.setattr(blade.runtime.artifact, "load", vanished)
    assert cache.load(key)[0] is None and (cache_dir / key).is_dir(), "a miss, and nothing removed"
    monkeypatch.undo()
    monkeypatch.setenv("BLADE_CACHE_DIR", str(cache_dir.parent))
    monkeypatch.setenv("BLADE_CACHE", "1")

    def full_disk(cm, path):
        (path / "partial").mkdir(parents=True)
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(blade.runtime.artifact, "save", full_disk)
    other = torch.nn.Linear(4, 4)
    cm = blade.compile(other, (torch.randn(2, 4),), backend="eager")
    assert cm.report.cache["stored"].startswith("not cached: RuntimeError: No space left")
    assert not list(cache_dir.glob(".tmp-*")), "the failed writer's folder is gone"
    monkeypatch.setenv("BLADE_CACHE_MAX_GB", "nan")
    with pytest.raises(blade.errors.ConfigError, match="BLADE_CACHE_MAX_GB='nan'"):
        cache.limit_bytes()
