"""The kernel registry (backends/kernels/registry.py): `import blade` loads no kernel; the order is as documented."""
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from blade.backends.kernels import registry
from blade.ops.attention import FLASH_ATTENTION, attention_reference
from helpers import attention_inputs

BF16 = torch.bfloat16
KERNEL_MODULES = ("attention_native", "attention_blocked", "attention_triton", "qgemm_triton")

PROBE = """
import json, os, sys
import torch
import blade
from blade.backends.kernels import registry
print(json.dumps({
    "loaded": registry.loaded(),
    "imported": sorted(m for m in sys.modules if m.startswith("blade.backends.kernels.") and m != registry.__name__
                       or m == "triton"),
    "overridden": [registry.overridden(op, device) for op in ("flash_attention", "qlinear")
                   for device in registry.DEVICES],
    "cache": sorted(os.listdir(os.environ["BLADE_CACHE_DIR"])),
    "routed": [torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
               for op in ("blade::flash_attention", "blade::qlinear") for key in ("CPU", "CUDA")],
}))
"""


def test_importing_blade_loads_no_kernel_and_builds_nothing(tmp_path):
    """A fresh `import blade` registers the ops' CPU/CUDA implementations (the registry's dispatch) and nothing else:
    no kernel module imported, triton not imported, no native build in the (empty) cache directory."""
    env = {**os.environ, "BLADE_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state == {"loaded": [], "imported": [], "overridden": [False] * 4, "cache": [], "routed": [True] * 4}, state


def documented_orders() -> dict:
    """(op, device) -> the names in order, from the module docstring's lines `op  device  a → b → reference`."""
    lines = re.findall(r"^\s+(\w+)\s+(cpu|cuda)\s+(\w+(?: → \w+)*)\s*$", registry.__doc__, re.MULTILINE)
    return {(op, device): chain.split(" → ") for op, device, chain in lines}


def test_the_choice_order_is_the_documented_one():
    documented = documented_orders()
    declared = {(k.op, k.device) for k in registry.KERNELS}
    assert set(documented) == declared
    for (op, device), names in documented.items():
        assert registry.order(op, device) == names
    assert documented[("flash_attention", "cpu")] == ["decode", "native", "blocked", "reference"]


def test_cpu_attention_follows_the_order(monkeypatch):
    """native where it runs and takes the call, else blocked at MIN_KEYS keys or more, else the reference."""
    long_args = [t.to(BF16) for t in attention_inputs(q_len=200, k_len=200, dim=64)] + [None, None, True]
    short_args = [t.to(BF16) for t in attention_inputs(q_len=64, k_len=64, dim=64)] + [None, None, True]
    fp32_args = list(attention_inputs(q_len=200, k_len=200, dim=64)) + [None, None, True]
    native = registry.kernel("flash_attention", "cpu", "native")
    first = "native" if native.load().available() else "blocked"
    assert registry.choose("flash_attention", "cpu", *long_args).name == first
    assert registry.choose("flash_attention", "cpu", *fp32_args) is attention_reference
    monkeypatch.setenv("BLADE_NATIVE_ATTENTION", "0")
    assert registry.choose("flash_attention", "cpu", *long_args).name == "blocked"
    assert registry.choose("flash_attention", "cpu", *short_args) is attention_reference


def test_an_override_replaces_the_chain_and_is_described():
    calls = []

    def mine(*args):
        calls.append(len(args))
        return attention_reference(*args)

    mine.description = "my kernel"
    q, k, v = attention_inputs(q_len=8, k_len=8, dim=16)
    with registry.override("flash_attention", "cpu", mine):
        assert registry.overridden("flash_attention", "cpu") and registry.candidates("flash_attention", "cpu") == []
        assert registry.describe("flash_attention", "cpu") == "my kernel"
        FLASH_ATTENTION(q, k, v, None, None, False)
    assert calls == [6] and not registry.overridden("flash_attention", "cpu")


def test_describe_names_the_cpu_chain():
    assert registry.describe("flash_attention", "cpu") == (
        "blade's CPU decode kernel (decode_attention.cpp) for one query per head; else blade's fused bf16 CPU kernel (attention_bf16.cpp, AVX512-BF16) where it runs; else its blocked bf16 CPU "
        "kernel at 128+ keys (faster than SDPA there, bench/results/attention_cpu.md); else PyTorch's SDPA")
    assert registry.describe("qlinear", "cpu") == (
        "blade's skinny CPU kernel (skinny_linear.cpp) for weight-only int8 over 1..128 rows; else the reference")


def test_a_kernel_module_that_fails_to_import_is_warned_once_and_skipped(monkeypatch):
    monkeypatch.setattr(registry, "_MODULES", {})
    with pytest.warns(RuntimeWarning, match="no_such_kernel"):
        assert registry._load("no_such_kernel") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry._load("no_such_kernel") is None
