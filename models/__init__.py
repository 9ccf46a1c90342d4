"""The workload zoo: hand-written models with example inputs and torch.export dynamic shapes."""
from __future__ import annotations

import torch
from torch import nn

from . import bert, dit, dlrm, gpt, gpt_decode, mlp, resnet, vit
from ._workload import SIZES, Workload

_MODULES = {"bert": bert, "dit": dit, "dlrm": dlrm, "gpt": gpt, "gpt_decode": gpt_decode, "mlp": mlp, "resnet": resnet,
            "vit": vit}

__all__ = ["SIZES", "get", "names", "sample_inputs", "workload"]


def names() -> list[str]:
    return sorted(_MODULES)


def workload(name: str, size: str = "tiny") -> Workload:
    if name not in _MODULES:
        raise ValueError(f"unknown model {name!r}; valid models are {names()}")
    return _MODULES[name].workload(size)


def get(name: str, size: str = "tiny") -> tuple[nn.Module, tuple[torch.Tensor, ...], tuple]:
    """(model in eval mode, example_inputs, dynamic_shapes for torch.export.export)."""
    return workload(name, size).triple()


def sample_inputs(name: str, size: str = "tiny", *, seed: int = 0, **dims: int) -> tuple[torch.Tensor, ...]:
    """Fresh valid inputs shaped like the example inputs, with dynamic dims (batch, seq, past) set from dims."""
    return workload(name, size).sample_inputs(seed=seed, **dims)
