"""The defaults a user gets: every zoo model and a real Hugging Face backbone (MobileViT-small at its reference size)
compiled with nothing but blade.compile(model, inputs, dynamic_shapes) — compile cache on in a fresh directory,
backend="auto" measuring its candidates, no debug checks — one after another in one process, then again in a
second process that must hit every entry; every output is checked against eager on the examples and on fresh
inputs at other sizes. (The rest of the suite runs with the cache and the measurement off: tests/conftest.py.)"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.utils._pytree as pytree
    import blade
    import blade.models as zoo
    from blade.perf.accuracy import relative_error
    from blade.models import hf

    def worst(compiled, model, inputs):
        with torch.no_grad():
            want = pytree.tree_leaves(model(*inputs))
        got = pytree.tree_leaves(compiled(*inputs))
        return max(relative_error(g, w) for g, w in zip(got, want))

    results = {}
    for name in zoo.names():
        model, example, dynamic = zoo.get(name)
        compiled = blade.compile(model, example, dynamic_shapes=dynamic)
        workload = zoo.workload(name)
        fresh = workload.sample_inputs(seed=7, **{n: min(max(3, d.min), d.max) for n, d in workload.dims.items()})
        results[name] = {"hit": compiled.report.cache["hit"], "backend": compiled.backend,
                         "example": worst(compiled, model, example), "fresh": worst(compiled, model, fresh)}
    model, example, _ = hf.mobilevit_small()
    compiled = blade.compile(model, example)
    fresh = (torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(7)),)
    results["hf.mobilevit_small"] = {"hit": compiled.report.cache["hit"], "backend": compiled.backend,
                                     "example": worst(compiled, model, example), "fresh": worst(compiled, model, fresh),
                                     "bisection": compiled.report.bisection}
    print(json.dumps(results))
""")


def test_the_zoo_and_a_real_backbone_with_the_defaults_in_two_processes(tmp_path):
    script = tmp_path / "defaults.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("BLADE_CACHE", "BLADE_AUTOTUNE", "BLADE_DEBUG")}
    env["BLADE_CACHE_DIR"] = str(tmp_path / "cache")
    runs = []
    for _ in range(2):
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
        assert run.returncode == 0, run.stderr[-4000:]
        runs.append(json.loads(run.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert {name: r["hit"] for name, r in first.items()} == {name: False for name in first}
    assert {name: r["hit"] for name, r in second.items()} == {name: True for name in first}
    for results in runs:
        wrong = {name: (r["example"], r["fresh"]) for name, r in results.items()
                 if not (r["example"] <= 1e-4 and r["fresh"] <= 1e-4)}
        assert wrong == {}, f"outputs differ from eager: {wrong}"
    assert first["hf.mobilevit_small"]["bisection"] == {}, "MobileViT needs no rewrite held back"
    assert {r["backend"] for r in first.values()} <= {"onnxruntime", "eager", "inductor"}
    assert [r["backend"] for r in first.values()] == [r["backend"] for r in second.values()], \
        "the measured choice is cached with the entry"
