"""A Vision Transformer: Conv2d patch embedding, CLS token, pre-LN encoder, classifier on CLS."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ._layers import MLP, PreNormBlock, SelfAttention, randomize_norms
from ._workload import BATCH, InputSpec, Workload, normal, select


@dataclass(frozen=True)
class ViTConfig:
    image_size: int
    patch_size: int
    hidden: int
    n_layers: int
    n_heads: int
    intermediate: int
    n_classes: int
    dropout: float = 0.0


CONFIGS = {
    "tiny": ViTConfig(image_size=32, patch_size=8, hidden=32, n_layers=2, n_heads=4, intermediate=64,
                      n_classes=10),
    "base": ViTConfig(image_size=224, patch_size=16, hidden=768, n_layers=12, n_heads=12, intermediate=3072,
                      n_classes=1000),
}


class ViT(nn.Module):
    """forward(images [B, 3, H, W]) -> class logits [B, n_classes]."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        n_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(3, config.hidden, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, config.hidden))
        self.position_embedding = nn.Parameter(0.02 * torch.randn(1, n_patches + 1, config.hidden))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            PreNormBlock(config.hidden,
                         SelfAttention(config.hidden, config.n_heads, dropout=config.dropout),
                         MLP([config.hidden, config.intermediate, config.hidden], nn.GELU),
                         norm=norm)
            for _ in range(config.n_layers)
        )
        self.final_norm = norm(config.hidden)
        self.head = nn.Linear(config.hidden, config.n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(images).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x)[:, 0])


def build(config: ViTConfig) -> nn.Module:
    model = ViT(config)
    randomize_norms(model)
    return model


def workload(size: str = "tiny") -> Workload:
    config = select(CONFIGS, size)
    return Workload(
        build=lambda: build(config),
        inputs=(InputSpec("images", ("batch", 3, config.image_size, config.image_size), normal()),),
        dims={"batch": BATCH},
    )


def tiny():
    return workload("tiny").triple()


def base():
    return workload("base").triple()
