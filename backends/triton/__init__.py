"""The Triton backend's package: for now its kernels (blade.backends.triton.kernels); the graph backend comes later."""
from __future__ import annotations

import importlib.util

import torch


def install_kernels() -> bool:
    """On a machine with a CUDA GPU and Triton, make blade's ops run their Triton kernels on CUDA.

    Imports triton only then, so CPU-only imports of blade stay light.
    """
    if importlib.util.find_spec("triton") is None or not torch.cuda.is_available():
        return False
    from blade.backends.triton.kernels import attention

    return attention.install()
