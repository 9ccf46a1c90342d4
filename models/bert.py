"""A BERT encoder: post-LN layers with hand-written masked attention, plus the tanh pooler."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._layers import MLP, SelfAttention, init_embeddings, randomize_norms
from ._workload import BATCH, ZooDim, InputSpec, Workload, integers, padding_mask, select

# Added to the scores of padded keys. Large enough that softmax gives them ~0 weight, small enough
# to stay finite in fp16 (torch.finfo(float32).min would overflow to -inf and NaN an all-pad row).
MASKED_SCORE = -10000.0


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    intermediate: int
    max_positions: int
    example_seq: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1


CONFIGS = {
    "tiny": BertConfig(vocab_size=100, hidden=32, n_layers=2, n_heads=4, intermediate=64, max_positions=64,
                       example_seq=12),
    "base": BertConfig(vocab_size=30522, hidden=768, n_layers=12, n_heads=12, intermediate=3072,
                       max_positions=512, example_seq=128),
}


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attn = SelfAttention(config.hidden, config.n_heads, dropout=config.dropout)
        self.attn_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.ffn = MLP([config.hidden, config.intermediate, config.hidden], nn.GELU)
        self.ffn_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, additive_mask))
        return self.ffn_norm(x + self.ffn(x))


class Bert(nn.Module):
    """forward(input_ids, attention_mask) -> (last_hidden_state [B, S, H], pooled_output [B, H])."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embedding = nn.Embedding(config.vocab_size, config.hidden)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden)
        self.token_type_embedding = nn.Embedding(config.type_vocab_size, config.hidden)
        self.embedding_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.n_layers))
        self.pooler = nn.Linear(config.hidden, config.hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Every token is segment 0, so the token-type embedding is a single broadcast row.
        x = (self.word_embedding(input_ids) + self.position_embedding(positions)
             + self.token_type_embedding.weight[0])
        x = self.embedding_dropout(self.embedding_norm(x))

        additive_mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * MASKED_SCORE
        for layer in self.layers:
            x = layer(x, additive_mask)
        return x, torch.tanh(self.pooler(x[:, 0]))


def build(config: BertConfig) -> nn.Module:
    model = Bert(config)
    init_embeddings(model)
    randomize_norms(model)
    return model


def workload(size: str = "tiny") -> Workload:
    config = select(CONFIGS, size)
    return Workload(
        build=lambda: build(config),
        inputs=(
            InputSpec("input_ids", ("batch", "seq"), integers(config.vocab_size)),
            InputSpec("attention_mask", ("batch", "seq"), padding_mask()),
        ),
        dims={"batch": BATCH, "seq": ZooDim(example=config.example_seq, min=2, max=config.max_positions)},
    )


def tiny():
    return workload("tiny").triple()


def base():
    return workload("base").triple()
