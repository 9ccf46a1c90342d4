"""Shared test helpers: outputs against a reference, over whole output structures; the CLI in-process."""
from __future__ import annotations

import contextlib
import io
import math
import subprocess

import torch
import torch.utils._pytree as pytree

from blade.perf.accuracy import relative_error


def assert_matches(out, ref, tol: float = 1e-6) -> None:
    """Same structure; every tensor within `tol` relative error (NaN fails); other leaves equal."""
    out_leaves, out_spec = pytree.tree_flatten(out)
    ref_leaves, ref_spec = pytree.tree_flatten(ref)
    assert out_spec == ref_spec, f"structure differs:\n{out_spec}\nvs\n{ref_spec}"
    for i, (o, r) in enumerate(zip(out_leaves, ref_leaves)):
        if isinstance(r, torch.Tensor):
            assert o.shape == r.shape and o.dtype == r.dtype, f"output {i}: {o.shape} {o.dtype} vs {r.shape} {r.dtype}"
            err = relative_error(o, r)
            assert not math.isnan(err) and err <= tol, f"output {i}: relative error {err} > {tol}"
        else:
            assert o == r, f"output {i}: {o!r} != {r!r}"


def run_cli(*args) -> subprocess.CompletedProcess:
    """`blade ARGS` in this process: exit code, stdout and stderr as a subprocess would give them, without the
    fresh interpreter and torch import (seconds) that each `python -m blade` costs."""
    from blade.tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def forbid_recompiling(monkeypatch) -> None:
    """Make any new capture or backend compile fail the test: calls must reuse what was compiled."""
    from blade.backends.eager import EagerBackend

    def recompiled(*args, **kwargs):
        raise AssertionError("recompiled")
    monkeypatch.setattr(torch.export, "export", recompiled)
    monkeypatch.setattr(EagerBackend, "compile", recompiled)


def fresh_dims(name: str) -> dict:
    """Dynamic dims for a zoo model at sizes other than its example (batch 2, seq 12)."""
    return {"bert": {"batch": 3, "seq": 7}, "gpt": {"batch": 3, "seq": 7},
            "gpt_decode": {"batch": 3, "past": 5}}.get(name, {"batch": 3})


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def gqa_capture_may_fail():
    """Seen with torch 2.11 (the GPU machine, 2026-11-25): torch.export of K/V heads repeated with
    repeat_interleave or expand+reshape under a dynamic seq fails with a guard it cannot prove
    (min(8*seq, 16*seq) == 8*seq). torch 2.13 captures them; blade's pass is not involved."""
    import pytest

    from blade.errors import CaptureError
    return pytest.mark.xfail(_torch_version() < (2, 13), raises=CaptureError, strict=False,
                             reason="torch.export < 2.13 cannot capture dynamic-seq repeated KV heads")


class Apply(torch.nn.Module):
    """A module whose forward applies `fn` to its one to three tensor arguments."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, y=None, z=None):
        return self.fn(*(t for t in (x, y, z) if t is not None))


def attention_inputs(batch=2, q_heads=4, kv_heads=4, q_len=40, k_len=40, dim=32, v_dim=None, seed=0):
    """Random fp32 q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, dim, generator=gen)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=gen)
    v = torch.randn(batch, kv_heads, k_len, v_dim or dim, generator=gen)
    return q, k, v


def finite_relative_error(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖, after asserting that out holds no NaN or inf."""
    assert torch.isfinite(out).all()
    return float((out.float() - ref).norm() / ref.norm())
