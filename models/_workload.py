"""Input specs and the (model, example_inputs, dynamic_shapes) triple shared by every zoo model."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

SIZES = ("tiny", "base")

Sampler = Callable[[tuple[int, ...], torch.Generator], torch.Tensor]
Config = TypeVar("Config")


def normal() -> Sampler:
    """Standard-normal float32 values."""
    return lambda shape, generator: torch.randn(shape, generator=generator)


def uniform(low: float, high: float) -> Sampler:
    """float32 values drawn uniformly from [low, high)."""
    return lambda shape, generator: low + (high - low) * torch.rand(shape, generator=generator)


def integers(high: int) -> Sampler:
    """int64 values in [0, high): token ids, class labels, embedding rows."""
    return lambda shape, generator: torch.randint(0, high, shape, generator=generator)


def padding_mask() -> Sampler:
    """int64 [batch, seq] mask of right padding: each row is 1s then 0s, with at least one 1."""

    def sample(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        batch, seq = shape
        lengths = torch.randint(1, seq + 1, (batch, 1), generator=generator)
        return (torch.arange(seq) < lengths).long()

    return sample


@dataclass(frozen=True)
class InputSpec:
    """One model input: its shape (str entries name a dynamic dim) and how to draw values."""

    name: str
    shape: tuple[int | str, ...]
    sample: Sampler


@dataclass(frozen=True)
class ZooDim:
    """A dynamic dim: its value in the example inputs and the range torch.export may assume."""

    example: int
    min: int
    max: int


BATCH = ZooDim(example=2, min=1, max=64)


@dataclass(frozen=True)
class Workload:
    """Everything needed to build a model and feed it: builder, input specs, dynamic dims."""

    build: Callable[[], nn.Module]
    inputs: tuple[InputSpec, ...]
    dims: Mapping[str, ZooDim]
    seed: int = 0

    def model(self) -> nn.Module:
        # fork_rng so building a model leaves the caller's global RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.build().eval()

    def sample_inputs(self, seed: int = 0, **dims: int) -> tuple[torch.Tensor, ...]:
        unknown = sorted(set(dims) - set(self.dims))
        if unknown:
            raise ValueError(f"unknown dim(s) {unknown}; this model's dynamic dims are {sorted(self.dims)}")
        sizes = {name: dim.example for name, dim in self.dims.items()} | dims
        generator = torch.Generator().manual_seed(seed)
        return tuple(
            spec.sample(tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape), generator)
            for spec in self.inputs
        )

    def dynamic_shapes(self) -> tuple[dict[int, torch.export.Dim] | None, ...]:
        export_dims = {name: torch.export.Dim(name, min=d.min, max=d.max) for name, d in self.dims.items()}
        return tuple(
            {i: export_dims[d] for i, d in enumerate(spec.shape) if isinstance(d, str)} or None
            for spec in self.inputs
        )

    def triple(self) -> tuple[nn.Module, tuple[torch.Tensor, ...], tuple[dict[int, torch.export.Dim] | None, ...]]:
        return self.model(), self.sample_inputs(), self.dynamic_shapes()


def select(configs: Mapping[str, Config], size: str) -> Config:
    """configs[size], or a ValueError that lists the valid sizes."""
    if size not in configs:
        raise ValueError(f"unknown size {size!r}; valid sizes are {list(configs)}")
    return configs[size]
