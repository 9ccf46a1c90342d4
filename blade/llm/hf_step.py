"""A Hugging Face causal LM as two exportable steps over a static KV cache: prefill a prompt, decode a token."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from blade.errors import InputError


def cache_layout(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a Hugging Face causal LM, from its config."""
    config = getattr(model, "config", None)
    needed = ("num_hidden_layers", "num_attention_heads", "hidden_size")
    if config is None or not all(hasattr(config, k) for k in needed):
        raise InputError(f"blade.llm.compile takes a Hugging Face causal LM (a model with a config holding "
                         f"{', '.join(needed)}); got {type(model).__name__}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def _cache_layer_class():
    """The cache layer type, built on first use so that importing blade.llm does not import transformers."""
    from transformers.cache_utils import CacheLayerMixin

    class SlotLayer(CacheLayerMixin):
        """One layer's keys and values, [slots, max_length, kv heads, head dim]: a step writes each row's new
        tokens at that row's positions (index_put, which blade runs in place) and reads back what attention needs."""

        is_compileable = True
        is_sliding = False

        def __init__(self, keys, values, rows, positions, prefill: bool):
            super().__init__()
            self.keys, self.values, self.rows, self.positions, self.prefill = keys, values, rows, positions, prefill
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            """Allocated once, by blade.llm."""

        def update(self, key_states, value_states, *args, **kwargs):
            where = (self.rows[:, None], self.positions)
            self.keys.index_put_(where, key_states.transpose(1, 2))
            self.values.index_put_(where, value_states.transpose(1, 2))
            if self.prefill:  # a prompt starts an empty row: it attends to itself only
                return key_states, value_states
            batch = key_states.shape[0]  # decode runs rows 0..batch-1: a slice, not a gather
            return self.keys[:batch].transpose(1, 2), self.values[:batch].transpose(1, 2)

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[1], 0

        def get_seq_length(self) -> int:
            return 0

        def get_max_cache_shape(self) -> int:
            return self.keys.shape[1]

        def get_max_length(self) -> int:
            return self.keys.shape[1]

    return SlotLayer


class _Step(nn.Module):
    """Shared by both steps: the cache as buffers (k0, v0, k1, ...) and the model's base and head."""

    prefill = False

    def __init__(self, model: nn.Module, max_batch: int, max_length: int, dtype: torch.dtype):
        super().__init__()
        self.model = model
        layers, kv_heads, head_dim = cache_layout(model)
        self.layers = layers
        for i in range(layers):
            for kind in "kv":
                self.register_buffer(f"{kind}{i}", torch.zeros(max_batch, max_length, kv_heads, head_dim, dtype=dtype),
                                     persistent=False)
        parameters = inspect.signature(model.base_model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def _logits(self, input_ids, rows, positions, mask, last):
        from transformers.cache_utils import Cache

        layer = _cache_layer_class()
        cache = Cache(layers=[layer(getattr(self, f"k{i}"), getattr(self, f"v{i}"), rows, positions, self.prefill)
                              for i in range(self.layers)])
        hidden = self.model.base_model(input_ids=input_ids, position_ids=positions, attention_mask=mask,
                                       use_cache=True, **{self.cache_argument: cache}).last_hidden_state
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.model.get_output_embeddings()(picked).float()


class PrefillStep(_Step):
    """forward(input_ids [B, T], rows [B], last [B]) -> logits [B, vocab] at each row's `last` token.

    Row i's prompt (left-aligned, padded on the right) goes into cache row rows[i] at positions 0..T-1; padding
    past a row's end writes slots its later tokens overwrite before any query can see them."""

    prefill = True

    def forward(self, input_ids, rows, last):
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        return self._logits(input_ids, rows, positions, causal.expand(batch, 1, length, length), last)


class DecodeStep(_Step):
    """forward(input_ids [B, 1], positions [B, 1]) -> logits [B, vocab]: cache rows 0..B-1 each take one token
    at their own position and attend to their slots 0..position."""

    def forward(self, input_ids, positions):
        batch = input_ids.shape[0]
        rows = torch.arange(batch, device=input_ids.device)
        slots = torch.arange(self.k0.shape[1], device=input_ids.device)
        mask = slots[None, None, None, :] <= positions[:, None, :, None]
        return self._logits(input_ids, rows, positions, mask, torch.zeros_like(rows))
