"""A plain multi-layer perceptron on [batch, features]."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ._layers import MLP
from ._workload import BATCH, InputSpec, Workload, normal, select


@dataclass(frozen=True)
class MLPConfig:
    in_features: int
    width: int
    n_layers: int  # Linear layers, the last one being the classifier
    out_features: int


CONFIGS = {
    "tiny": MLPConfig(in_features=16, width=32, n_layers=3, out_features=10),
    "base": MLPConfig(in_features=2048, width=2048, n_layers=4, out_features=1000),
}


def build(config: MLPConfig) -> nn.Module:
    sizes = [config.in_features] + [config.width] * (config.n_layers - 1) + [config.out_features]
    return MLP(sizes, nn.GELU)


def workload(size: str = "tiny") -> Workload:
    config = select(CONFIGS, size)
    return Workload(
        build=lambda: build(config),
        inputs=(InputSpec("x", ("batch", config.in_features), normal()),),
        dims={"batch": BATCH},
    )


def tiny():
    return workload("tiny").triple()


def base():
    return workload("base").triple()
