"""Test-wide settings: verify the IR after every pass of every compile; a fresh peaks cache; without a
CUDA GPU, Triton kernels run under Triton's interpreter on CPU tensors (set before anything imports triton)."""
import os
import tempfile

import torch

os.environ.setdefault("BLADE_DEBUG", "1")
# The tests' own peaks cache (CLI subprocesses inherit it), not the user's ~/.cache: measured on the
# first run on a machine, then reused (entries are keyed by device, threads and versions).
os.environ.setdefault("BLADE_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"blade-test-cache-{os.getuid()}"))
# The compile cache is off in tests (a hit would skip the passes under test); tests/test_cache.py turns it on.
os.environ.setdefault("BLADE_CACHE", "0")
# backend="auto" follows the fixed rule in tests (measuring candidates would change which backend every test
# gets); tests/test_selection.py and tests/backends/test_inductor.py turn measurement on.
os.environ.setdefault("BLADE_AUTOTUNE", "0")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fcntl  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The suite runs on two xdist workers (pyproject's addopts: -n 2 --dist loadfile). A file goes to one worker whole,
# so the files that take longest are handed out first and the run does not end on one worker alone.
LONGEST_FIRST = ("test_defaults.py", "test_cache_identity.py", "test_profile.py", "serve/test_server.py",
                 "serve/test_completions.py", "test_cache.py", "test_pipeline.py", "test_hf_vision.py",
                 "test_lowering.py", "llm/test_generate.py", "backends/test_inductor.py", "backends/test_onnxruntime.py")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    def rank(item):
        relative = Path(str(item.fspath)).resolve().relative_to(TESTS).as_posix()
        return LONGEST_FIRST.index(relative) if relative in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: a file's tests keep their order


# A test marked `timing` compares measured times, which the other worker's load would skew: it runs alone. Every
# test holds a shared lock on one file while it runs and a `timing` test an exclusive one; a turnstile lock taken
# first keeps the shared holders from starving the exclusive one.
_LOCKS = Path(os.environ["BLADE_CACHE_DIR"])


@pytest.fixture(autouse=True)
def _timing_runs_alone(request):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    _LOCKS.mkdir(parents=True, exist_ok=True)
    alone = request.node.get_closest_marker("timing") is not None
    with open(_LOCKS / "tests-turnstile.lock", "a") as turnstile, open(_LOCKS / "tests-timing.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)
