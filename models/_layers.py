"""Hand-written building blocks shared by the zoo: attention, MLPs, norms, transformer blocks."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention spelled out op by op; n_kv_heads < n_heads gives grouped-query attention."""

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int | None = None, bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if hidden % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"hidden={hidden}, n_heads={n_heads}, n_kv_heads={n_kv_heads} do not divide evenly")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, hidden // n_heads
        self.q_proj = nn.Linear(hidden, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, n_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * self.head_dim, hidden, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self._split_heads(self.q_proj(x), self.n_heads)
        k = self._split_heads(self.k_proj(x), self.n_kv_heads)
        v = self._split_heads(self.v_proj(x), self.n_kv_heads)
        if self.n_kv_heads != self.n_heads:
            group = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)

        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if additive_mask is not None:
            scores = scores + additive_mask
        if causal:
            allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool, device=x.device))
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = self.dropout(scores.softmax(dim=-1))

        out = (probs @ v).transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return self.out_proj(out)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K and V of x, [batch, n_kv_heads, seq, head_dim] (what a KV cache holds)."""
        return self._split_heads(self.k_proj(x), self.n_kv_heads), self._split_heads(self.v_proj(x), self.n_kv_heads)

    def step(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode one token: x [batch, 1, hidden] attends to the cache and itself (nothing masked).
        Returns (out, K, V) with the cache grown by one. With fewer KV heads, the query heads of a
        group are stacked into one [group, head_dim] block per KV head, so nothing is repeated."""
        batch, seq, _ = x.shape
        if seq != 1:
            raise ValueError(f"step decodes one token at a time, got {seq}")
        q = self._split_heads(self.q_proj(x), self.n_heads)
        k_new, v_new = self.keys_values(x)
        k, v = torch.cat([past_k, k_new], dim=2), torch.cat([past_v, v_new], dim=2)
        q = q.reshape(batch, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim)
        probs = (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)).softmax(dim=-1)
        out = (probs @ v).reshape(batch, 1, self.n_heads * self.head_dim)
        return self.out_proj(out), k, v


class MLP(nn.Sequential):
    """Linear layers with an activation between them (and after the last one if final_activation)."""

    def __init__(self, sizes: list[int], activation: Callable[[], nn.Module], final_activation: bool = False,
                 bias: bool = True):
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(n_in, n_out, bias=bias))
            if final_activation or i < len(sizes) - 2:
                layers.append(activation())
        super().__init__(*layers)


class SwiGLU(nn.Module):
    """LLaMA-style gated feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    """Root-mean-square norm written out (x * rsqrt(mean(x^2) + eps) * weight) rather than nn.RMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class PreNormBlock(nn.Module):
    """Pre-LN transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, hidden: int, attention: SelfAttention, mlp: nn.Module,
                 norm: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.attn_norm = norm(hidden)
        self.attn = attention
        self.mlp_norm = norm(hidden)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), causal=causal)
        return x + self.mlp(self.mlp_norm(x))

    def step(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoding step through the block (see SelfAttention.step): (x, K, V)."""
        attended, k, v = self.attn.step(self.attn_norm(x), past_k, past_v)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), k, v


def randomize_norms(model: nn.Module, spread: float = 0.1) -> None:
    """Perturb norm affine params and BatchNorm running stats away from identity.

    Fresh norms are an exact identity map (weight 1, bias 0, mean 0, var 1), so a pass that
    mishandled them would still pass numeric checks; random values make them count.
    """
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, RMSNorm)):
                continue
            if getattr(module, "weight", None) is not None:
                module.weight.copy_(1 + spread * torch.randn_like(module.weight))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(spread * torch.randn_like(module.bias))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(spread * torch.randn_like(module.running_mean))
                module.running_var.copy_(0.5 + torch.rand_like(module.running_var))


def init_embeddings(model: nn.Module, std: float = 0.02) -> None:
    """BERT/GPT-2 style N(0, std) embeddings; torch's N(0, 1) default gives huge tied-head logits."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
