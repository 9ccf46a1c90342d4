"""A causal decoder LM: GPT-2 style by default, LLaMA-style (GQA, RMSNorm, SwiGLU) by config."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ._layers import MLP, PreNormBlock, RMSNorm, SelfAttention, SwiGLU, init_embeddings, randomize_norms
from ._workload import BATCH, ZooDim, InputSpec, Workload, integers, select


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    max_positions: int
    example_seq: int
    n_kv_heads: int | None = None  # fewer than n_heads: grouped-query attention
    intermediate: int | None = None  # defaults to 4 * hidden
    rms_norm: bool = False  # RMSNorm instead of LayerNorm
    swiglu: bool = False  # SwiGLU feed-forward instead of Linear-GELU-Linear
    bias: bool = True
    dropout: float = 0.1


CONFIGS = {
    "tiny": GPTConfig(vocab_size=100, hidden=32, n_layers=2, n_heads=4, max_positions=64, example_seq=12),
    "base": GPTConfig(vocab_size=50257, hidden=768, n_layers=12, n_heads=12, max_positions=1024,
                      example_seq=256),
}
TINY_LLAMA = GPTConfig(vocab_size=100, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=80,
                       max_positions=64, example_seq=12, rms_norm=True, swiglu=True, bias=False)


def make_block(config: GPTConfig) -> PreNormBlock:
    intermediate = config.intermediate or 4 * config.hidden
    if config.swiglu:
        mlp = SwiGLU(config.hidden, intermediate, bias=config.bias)
    else:
        mlp = MLP([config.hidden, intermediate, config.hidden], partial(nn.GELU, approximate="tanh"),
                  bias=config.bias)
    attention = SelfAttention(config.hidden, config.n_heads, config.n_kv_heads, bias=config.bias,
                              dropout=config.dropout)
    return PreNormBlock(config.hidden, attention, mlp, norm=RMSNorm if config.rms_norm else nn.LayerNorm)


class GPT(nn.Module):
    """forward(input_ids [B, S]) -> logits [B, S, vocab]; the LM head shares the token embedding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(make_block(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.hidden) if config.rms_norm else nn.LayerNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.dropout(self.token_embedding(input_ids) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x, causal=True)
        return self.lm_head(self.final_norm(x))


def build(config: GPTConfig) -> nn.Module:
    model = GPT(config)
    init_embeddings(model)
    randomize_norms(model)
    return model


def workload_for(config: GPTConfig) -> Workload:
    return Workload(
        build=lambda: build(config),
        inputs=(InputSpec("input_ids", ("batch", "seq"), integers(config.vocab_size)),),
        dims={"batch": BATCH, "seq": ZooDim(example=config.example_seq, min=2, max=config.max_positions)},
    )


def workload(size: str = "tiny") -> Workload:
    return workload_for(select(CONFIGS, size))


def tiny():
    return workload("tiny").triple()


def base():
    return workload("base").triple()


def tiny_llama():
    """The tiny GPT with grouped-query attention (2 KV heads for 4 query heads), RMSNorm and SwiGLU."""
    return workload_for(TINY_LLAMA).triple()
