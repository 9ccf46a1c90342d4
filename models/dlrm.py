"""DLRM: bottom MLP on dense features, EmbeddingBag tables on sparse ones, pairwise dot interaction, top MLP."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._layers import MLP
from ._workload import BATCH, InputSpec, Workload, integers, normal, select


@dataclass(frozen=True)
class DLRMConfig:
    n_tables: int
    rows_per_table: int
    embedding_dim: int
    bag_size: int  # indices pooled (summed) per table per sample
    bottom_hidden: tuple[int, ...]
    top_hidden: tuple[int, ...]
    n_dense: int = 13


CONFIGS = {
    "tiny": DLRMConfig(n_tables=3, rows_per_table=50, embedding_dim=8, bag_size=4, bottom_hidden=(16,),
                       top_hidden=(16,)),
    # 8 x 100k x 64 fp32 tables are ~205 MB.
    "base": DLRMConfig(n_tables=8, rows_per_table=100_000, embedding_dim=64, bag_size=8,
                       bottom_hidden=(512, 256), top_hidden=(512, 256)),
}


class DLRM(nn.Module):
    """forward(dense_features [B, 13] float, sparse_indices [B, n_tables, bag] int64) -> click prob [B, 1]."""

    def __init__(self, config: DLRMConfig):
        super().__init__()
        dim = config.embedding_dim
        self.bottom_mlp = MLP([config.n_dense, *config.bottom_hidden, dim], nn.ReLU, final_activation=True)
        self.tables = nn.ModuleList(
            nn.EmbeddingBag(config.rows_per_table, dim, mode="sum") for _ in range(config.n_tables)
        )
        n_features = config.n_tables + 1
        rows, cols = torch.triu_indices(n_features, n_features, offset=1)
        # Flat positions of the strict upper triangle of the [n_features, n_features] dot-product matrix.
        self.register_buffer("pair_index", rows * n_features + cols, persistent=False)
        self.top_mlp = MLP([dim + len(rows), *config.top_hidden, 1], nn.ReLU)

    def forward(self, dense_features: torch.Tensor, sparse_indices: torch.Tensor) -> torch.Tensor:
        dense = self.bottom_mlp(dense_features)
        pooled = [table(sparse_indices[:, i]) for i, table in enumerate(self.tables)]
        features = torch.stack([dense, *pooled], dim=1)
        dots = torch.bmm(features, features.transpose(1, 2)).flatten(1)
        pairs = dots.index_select(1, self.pair_index)
        return torch.sigmoid(self.top_mlp(torch.cat([dense, pairs], dim=1)))


def build(config: DLRMConfig) -> nn.Module:
    model = DLRM(config)
    with torch.no_grad():
        # std 1/sqrt(dim) keeps dot products of summed bags near unit scale, so the sigmoid does not saturate.
        for table in model.tables:
            table.weight.normal_(0.0, config.embedding_dim ** -0.5)
        # The reference DLRM init; torch's default shrinks activations ~6x per ReLU layer, which left
        # the click probability almost constant across a batch.
        for linear in [*model.bottom_mlp, *model.top_mlp]:
            if isinstance(linear, nn.Linear):
                fan_out, fan_in = linear.weight.shape
                linear.weight.normal_(0.0, (2.0 / (fan_in + fan_out)) ** 0.5)
                linear.bias.normal_(0.0, fan_out ** -0.5)
    return model


def workload(size: str = "tiny") -> Workload:
    config = select(CONFIGS, size)
    return Workload(
        build=lambda: build(config),
        inputs=(
            InputSpec("dense_features", ("batch", config.n_dense), normal()),
            InputSpec("sparse_indices", ("batch", config.n_tables, config.bag_size),
                      integers(config.rows_per_table)),
        ),
        dims={"batch": BATCH},
    )


def tiny():
    return workload("tiny").triple()


def base():
    return workload("base").triple()
