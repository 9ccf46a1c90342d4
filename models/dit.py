"""A class-conditional Diffusion Transformer (DiT) with adaLN-Zero modulation, predicting noise on latents."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ._layers import MLP, SelfAttention
from ._workload import BATCH, InputSpec, Workload, integers, normal, select, uniform

N_DIFFUSION_STEPS = 1000


@dataclass(frozen=True)
class DiTConfig:
    latent_size: int
    patch_size: int
    hidden: int
    n_blocks: int
    n_heads: int
    n_classes: int
    latent_channels: int = 4
    mlp_ratio: int = 4
    frequency_dim: int = 256  # width of the sinusoidal timestep features


CONFIGS = {
    "tiny": DiTConfig(latent_size=8, patch_size=2, hidden=32, n_blocks=2, n_heads=4, n_classes=10,
                      frequency_dim=64),
    "base": DiTConfig(latent_size=32, patch_size=2, hidden=384, n_blocks=12, n_heads=6, n_classes=1000),
}


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] timesteps -> [B, dim] cos/sin features at geometrically spaced frequencies, in t's dtype when it is
    floating (fp32 for integer timesteps); the angles themselves are computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return features.to(t.dtype) if t.is_floating_point() else features


def sincos_position_embedding(hidden: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding [1, grid * grid, hidden]: half the channels encode x, half encode y."""
    coords = torch.arange(grid, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    quarter = hidden // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = [fn(pos.reshape(-1, 1) * omega) for pos in (xs, ys) for fn in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).unsqueeze(0)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def adaln_modulation(hidden: int, n_outputs: int) -> nn.Sequential:
    # DiT zero-initialises this Linear ("adaLN-Zero"); here it stays random so outputs are not trivially zero.
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden, n_outputs * hidden))


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        hidden = config.hidden
        self.attn_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden, config.n_heads)
        self.mlp_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP([hidden, config.mlp_ratio * hidden, hidden], partial(nn.GELU, approximate="tanh"))
        self.modulation = adaln_modulation(hidden, 6)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = (
            self.modulation(condition).unsqueeze(1).chunk(6, dim=-1))
        x = x + gate_attn * self.attn(modulate(self.attn_norm(x), shift_attn, scale_attn))
        return x + gate_mlp * self.mlp(modulate(self.mlp_norm(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = adaln_modulation(config.hidden, 2)
        self.linear = nn.Linear(config.hidden, config.patch_size ** 2 * config.latent_channels)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(condition).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """forward(latents [B, C, H, W], timesteps [B] float, class_labels [B] int64) -> noise [B, C, H, W]."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        grid = config.latent_size // config.patch_size
        self.patch_embedding = nn.Conv2d(config.latent_channels, config.hidden, config.patch_size,
                                         stride=config.patch_size)
        self.register_buffer("position_embedding", sincos_position_embedding(config.hidden, grid))
        self.timestep_mlp = MLP([config.frequency_dim, config.hidden, config.hidden], nn.SiLU)
        self.class_embedding = nn.Embedding(config.n_classes, config.hidden)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.n_blocks))
        self.final_layer = FinalLayer(config)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, grid*grid, p*p*C] -> [B, C, grid*p, grid*p]."""
        p, channels = self.config.patch_size, self.config.latent_channels
        grid = self.config.latent_size // p
        patches = tokens.view(tokens.shape[0], grid, grid, p, p, channels)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], channels, grid * p, grid * p)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(latents).flatten(2).transpose(1, 2) + self.position_embedding
        condition = (self.timestep_mlp(timestep_features(timesteps, self.config.frequency_dim))
                     + self.class_embedding(class_labels))
        for block in self.blocks:
            x = block(x, condition)
        return self.unpatchify(self.final_layer(x, condition))


def build(config: DiTConfig) -> nn.Module:
    model = DiT(config)
    nn.init.normal_(model.class_embedding.weight, std=0.02)
    return model


def workload(size: str = "tiny") -> Workload:
    config = select(CONFIGS, size)
    latent_shape = (config.latent_channels, config.latent_size, config.latent_size)
    return Workload(
        build=lambda: build(config),
        inputs=(
            InputSpec("latents", ("batch", *latent_shape), normal()),
            InputSpec("timesteps", ("batch",), uniform(0.0, N_DIFFUSION_STEPS)),
            InputSpec("class_labels", ("batch",), integers(config.n_classes)),
        ),
        dims={"batch": BATCH},
    )


def tiny():
    return workload("tiny").triple()


def base():
    return workload("base").triple()
