"""Test-wide settings: verify the IR after every pass of every compile; a fresh peaks cache; without a
CUDA GPU, Triton kernels run under Triton's interpreter on CPU tensors (set before anything imports triton)."""
import os
import tempfile

import torch

os.environ.setdefault("BLADE_DEBUG", "1")
# Machine peaks are measured once per test session (CLI subprocesses inherit it), not read from ~/.cache.
os.environ.setdefault("BLADE_CACHE_DIR", tempfile.mkdtemp(prefix="blade-test-cache-"))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
