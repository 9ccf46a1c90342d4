"""The compile cache never gives one model another's program: distinct modules of one installed package
(parameterless, equal input specs) get distinct keys and their own outputs — in one process, in a new process,
and over a seeded random sequence of compiles — and what the key reads of the user's globals changes it."""
import functools
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import blade
from blade.runtime import cache
from blade.perf.accuracy import relative_error

transformers = pytest.importorskip("transformers")
from transformers import activations as hf  # noqa: E402

X = torch.linspace(-3, 3, 32).reshape(4, 8)


class Apply(torch.nn.Module):
    """A parameterless module whose behaviour is one attribute: a function, a builtin or a partial."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class ReluLinear(torch.nn.Linear):
    """torch's Linear with a different forward: same weights, same specs, another model."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias).relu()


def _linear(cls):
    torch.manual_seed(0)
    return cls(8, 8)


# label -> factory: every entry is a different model; two calls of one factory are the same model.
CATALOGUE = {
    "ReLU": torch.nn.ReLU, "ReLU6": torch.nn.ReLU6, "GELU": torch.nn.GELU,
    "GELU(tanh)": lambda: torch.nn.GELU(approximate="tanh"), "SiLU": torch.nn.SiLU, "Mish": torch.nn.Mish,
    "Tanh": torch.nn.Tanh, "Sigmoid": torch.nn.Sigmoid, "Hardtanh": torch.nn.Hardtanh,
    "Hardswish": torch.nn.Hardswish, "Hardsigmoid": torch.nn.Hardsigmoid, "Softsign": torch.nn.Softsign,
    "Tanhshrink": torch.nn.Tanhshrink, "LogSigmoid": torch.nn.LogSigmoid, "Softplus": torch.nn.Softplus,
    "Softplus(beta=2)": lambda: torch.nn.Softplus(beta=2.0), "ELU": torch.nn.ELU,
    "ELU(0.5)": lambda: torch.nn.ELU(alpha=0.5), "SELU": torch.nn.SELU, "CELU": torch.nn.CELU,
    "LeakyReLU(0.1)": lambda: torch.nn.LeakyReLU(0.1), "LeakyReLU(0.2)": lambda: torch.nn.LeakyReLU(0.2),
    "Softmax(-1)": lambda: torch.nn.Softmax(-1), "Softmax(0)": lambda: torch.nn.Softmax(0),
    "LogSoftmax(-1)": lambda: torch.nn.LogSoftmax(-1), "Softmin(-1)": lambda: torch.nn.Softmin(-1),
    "Hardshrink": torch.nn.Hardshrink, "Softshrink": torch.nn.Softshrink,
    "Threshold": lambda: torch.nn.Threshold(0.1, 20.0), "Identity": torch.nn.Identity,
    "Flatten(0)": lambda: torch.nn.Flatten(0),
    "hf.GELUActivation": hf.GELUActivation, "hf.NewGELUActivation": hf.NewGELUActivation,
    "hf.FastGELUActivation": hf.FastGELUActivation, "hf.QuickGELUActivation": hf.QuickGELUActivation,
    "hf.LaplaceActivation": hf.LaplaceActivation, "hf.ReLUSquaredActivation": hf.ReLUSquaredActivation,
    "Apply(torch.tanh)": lambda: Apply(torch.tanh), "Apply(torch.sigmoid)": lambda: Apply(torch.sigmoid),
    "Apply(F.gelu)": lambda: Apply(F.gelu), "Apply(F.silu)": lambda: Apply(F.silu),
    "Apply(partial gelu tanh)": lambda: Apply(functools.partial(F.gelu, approximate="tanh")),
    "Apply(lambda x*2)": lambda: Apply(lambda x: x * 2), "Apply(lambda x*3)": lambda: Apply(lambda x: x * 3),
    "Linear": lambda: _linear(torch.nn.Linear), "ReluLinear": lambda: _linear(ReluLinear),
}


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLADE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BLADE_CACHE", "1")
    return tmp_path / "cache"


def _key(model) -> str:
    digest, why = cache.source_digest(model, (X,), None, None)
    assert digest is not None, why
    return digest


def _check(label: str, compiled) -> None:
    with torch.no_grad():
        want = CATALOGUE[label]()(X)
    got = compiled(X)
    assert got.shape == want.shape and relative_error(got, want) <= 1e-6, f"{label} got another model's outputs"


def test_every_model_of_the_catalogue_has_its_own_key_and_equal_models_share_one():
    keys = {label: _key(factory()) for label, factory in CATALOGUE.items()}
    by_key: dict[str, list[str]] = {}
    for label, key in keys.items():
        by_key.setdefault(key, []).append(label)
    assert [labels for labels in by_key.values() if len(labels) > 1] == []
    again = list(CATALOGUE)[::5]  # (the two-process test hits every entry)
    assert all(_key(CATALOGUE[label]()) == keys[label] for label in again), \
        "a fresh instance of the same model keys the same (so a new process can hit)"


def test_a_new_process_hits_each_entry_with_its_own_outputs(fresh_cache, tmp_path):
    """Two processes run the same script (the key includes the user's loaded modules, so pytest's own process
    is not one of them); the second compiles the catalogue in reverse order and must hit every entry."""
    script = tmp_path / "compile_catalogue.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import torch, blade
        from test_cache_identity import CATALOGUE, X
        from blade.perf.accuracy import relative_error
        results = {{}}
        labels = list(CATALOGUE)[::int(sys.argv[1])]
        for label in labels:
            compiled = blade.compile(CATALOGUE[label](), (X,), backend="eager")
            with torch.no_grad():
                want = CATALOGUE[label]()(X)
            results[label] = [compiled.report.cache["hit"], relative_error(compiled(X), want)]
        print(json.dumps(results))
    """))
    env = {**os.environ, "BLADE_CACHE_DIR": str(fresh_cache), "BLADE_CACHE": "1"}
    for order, hit in (("1", False), ("-1", True)):
        run = subprocess.run([sys.executable, str(script), order], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        results = json.loads(run.stdout.strip().splitlines()[-1])
        assert {label: got for label, (got, _) in results.items()} == {label: hit for label in CATALOGUE}
        assert {label: err for label, (_, err) in results.items() if not err <= 1e-6} == {}


def test_a_random_sequence_of_compiles_hits_exactly_the_models_seen_before(fresh_cache):
    """Property-style: seeded random draws (repeats included) in one cache; a hit iff the same model came before."""
    rng = random.Random(2026)
    labels = list(CATALOGUE)
    seen = set()
    for label in [rng.choice(labels) for _ in range(30)]:
        compiled = blade.compile(CATALOGUE[label](), (X,), backend="eager")
        assert compiled.report.cache["hit"] is (label in seen), label
        _check(label, compiled)
        seen.add(label)


SCALE = 2.0


class ByGlobal(torch.nn.Module):
    def forward(self, x):
        return x * SCALE + SETTINGS.shift


class _Settings:
    def __init__(self, shift):
        self.shift = shift


SETTINGS = _Settings(0.5)


def test_the_users_globals_read_by_forward_are_in_the_key(fresh_cache, monkeypatch):
    first = blade.compile(ByGlobal(), (X,), backend="eager")
    torch.testing.assert_close(first(X), X * 2.0 + 0.5)
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)
    scaled = blade.compile(ByGlobal(), (X,), backend="eager")
    assert scaled.report.cache["hit"] is False
    torch.testing.assert_close(scaled(X), X * 3.0 + 0.5)
    monkeypatch.setattr(SETTINGS, "shift", -1.0)  # a field of an object the code reads as a global
    shifted = blade.compile(ByGlobal(), (X,), backend="eager")
    assert shifted.report.cache["hit"] is False
    torch.testing.assert_close(shifted(X), X * 3.0 - 1.0)


def test_a_global_that_cannot_be_hashed_keys_by_the_captured_graph(fresh_cache, monkeypatch):
    monkeypatch.setattr(SETTINGS, "shift", torch.Generator())  # no stable hash; never read as a number here
    digest, why = cache.source_digest(ByGlobal(), (X,), None, None)
    assert digest is None and "Generator" in why
