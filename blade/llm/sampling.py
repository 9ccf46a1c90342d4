"""The next token from a step's logits: greedy or sampled, with Hugging Face generate's processors and order."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from blade.errors import InputError


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen; the same meaning as the arguments of transformers' generate."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_new_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")

    def scores(self, logits: torch.Tensor, generated: int) -> torch.Tensor:
        """The processed scores [B, vocab] after `generated` new tokens (the order generate applies them in)."""
        scores = logits.float()
        if generated < self.min_new_tokens and self.eos_token_ids:
            scores = scores.clone()
            scores[:, list(self.eos_token_ids)] = -float("inf")
        if not self.do_sample:
            return scores
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k is not None:
            k = min(self.top_k, scores.shape[-1])
            kth = torch.topk(scores, k).values[..., -1, None]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if self.top_p is not None and self.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.top_p
            drop[..., -1] = False  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        return scores

    def choose(self, logits: torch.Tensor, generated: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The next token of every row, [B] int64."""
        scores = self.scores(logits, generated)
        if not self.do_sample:
            return scores.argmax(-1)
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
