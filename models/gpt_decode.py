"""One decoding step of the zoo's GPT, its key/value cache as explicit inputs and outputs.

forward(input_ids [B, 1], past_keys [L, B, Hkv, P, D], past_values [L, B, Hkv, P, D])
    -> (logits [B, 1, vocab], keys [L, B, Hkv, P + 1, D], values [L, B, Hkv, P + 1, D])

Batch and past length P are dynamic. This is LLM decoding's memory-bound case: every step reads
all the weights and the whole cache to make one token. Sizes: tiny, base (the `gpt` base model),
7b (Llama-2-7B's dims: 32 layers, hidden 4096, 32 heads, SwiGLU 11008, RMSNorm, vocab 32000;
built in fp16 on a CUDA GPU only; its cache inputs must be moved there as fp16 too).
"""
from __future__ import annotations

import torch
from torch import nn

from . import gpt
from ._workload import BATCH, InputSpec, Workload, ZooDim, integers, normal, select

LLAMA2_7B = gpt.GPTConfig(vocab_size=32000, hidden=4096, n_layers=32, n_heads=32, max_positions=4096,
                          example_seq=128, intermediate=11008, rms_norm=True, swiglu=True, bias=False)
CONFIGS = {"tiny": gpt.CONFIGS["tiny"], "base": gpt.CONFIGS["base"], "7b": LLAMA2_7B}


class GPTDecode(nn.Module):
    """A GPT (shared, not copied) run one token at a time against a KV cache."""

    def __init__(self, model: gpt.GPT):
        super().__init__()
        self.gpt = model

    def forward(self, input_ids: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor):
        past = past_keys.shape[3]
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        x = self.gpt.dropout(self.gpt.token_embedding(input_ids) + self.gpt.position_embedding(positions))
        keys, values = [], []
        for i, block in enumerate(self.gpt.blocks):
            x, k, v = block.step(x, past_keys[i], past_values[i])
            keys.append(k)
            values.append(v)
        return self.gpt.lm_head(self.gpt.final_norm(x)), torch.stack(keys), torch.stack(values)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache a full forward over input_ids leaves: (keys, values), each [L, B, Hkv, S, D]."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.gpt.token_embedding(input_ids) + self.gpt.position_embedding(positions)
        keys, values = [], []
        for block in self.gpt.blocks:
            k, v = block.attn.keys_values(block.attn_norm(x))
            keys.append(k)
            values.append(v)
            x = block(x, causal=True)
        return torch.stack(keys), torch.stack(values)


def build(config: gpt.GPTConfig) -> nn.Module:
    if config is LLAMA2_7B:
        if not torch.cuda.is_available():
            raise ValueError("gpt_decode size '7b' is built for a CUDA GPU only (about 13.5 GB in fp16); "
                             "use 'tiny' or 'base' on a CPU")
        with torch.device("cuda"):
            return GPTDecode(gpt.build(config)).half()
    return GPTDecode(gpt.build(config))


def workload_for(config: gpt.GPTConfig) -> Workload:
    kv_heads, head_dim = config.n_kv_heads or config.n_heads, config.hidden // config.n_heads
    cache = (config.n_layers, "batch", kv_heads, "past", head_dim)
    return Workload(
        build=lambda: build(config),
        inputs=(InputSpec("input_ids", ("batch", 1), integers(config.vocab_size)),
                InputSpec("past_keys", cache, normal()), InputSpec("past_values", cache, normal())),
        dims={"batch": BATCH, "past": ZooDim(example=config.example_seq - 1, min=1, max=config.max_positions - 1)},
    )


def workload(size: str = "tiny") -> Workload:
    return workload_for(select(CONFIGS, size))


def tiny():
    return workload("tiny").triple()


def tiny_llama():
    """The decode step of gpt.tiny_llama (grouped-query attention: 2 KV heads for 4 query heads)."""
    return workload_for(gpt.TINY_LLAMA).triple()
