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
