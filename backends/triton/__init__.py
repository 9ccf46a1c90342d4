"""The Triton backend's package: for now its kernels (blade.backends.triton.kernels); the graph backend comes later."""
from __future__ import annotations

import importlib.util
import warnings

import torch


def install_kernels() -> bool:
    """On a machine with a CUDA GPU and Triton, make blade's ops run their Triton kernels on CUDA.

    Imports triton only then, so CPU-only imports of blade stay light.
    """
    if importlib.util.find_spec("triton") is None or not torch.cuda.is_available():
        return False
    try:
        from blade.backends.triton.kernels import attention
    except Exception as exc:  # noqa: BLE001 - a broken Triton install must not break `import blade`
        warnings.warn(f"blade: Triton kernels not installed ({type(exc).__name__}: {exc}); "
                      "blade::flash_attention runs its PyTorch reference on CUDA", stacklevel=2)
        return False
    return attention.install()
