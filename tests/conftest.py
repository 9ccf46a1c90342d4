"""Test-wide settings: verify the IR after every pass of every compile; without a CUDA GPU, Triton
kernels run under Triton's interpreter on CPU tensors (set before anything imports triton)."""
import os

import torch

os.environ.setdefault("BLADE_DEBUG", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
