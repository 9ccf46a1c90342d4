"""Hugging Face causal LMs at reference sizes, random weights, for blade.llm (`blade generate
blade.models.hf_lm:gpt2`). Needs `transformers` (the test extra). Each factory returns the model alone."""
from __future__ import annotations

import torch

# a Llama-architecture model of ~134 M parameters: RoPE, GQA (12 query / 4 key-value heads), SwiGLU, RMSNorm
LLAMA_134M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)


def _seeded(build):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build().eval()


def gpt2():
    """GPT-2 base (124 M parameters; transformers' GPT2Config defaults)."""
    import transformers

    return _seeded(lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config()))


def llama_134m():
    """A Llama-architecture model of 134 M parameters (LLAMA_134M)."""
    import transformers

    return _seeded(lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_134M)))


def gpt2_tiny():
    """A 2-layer GPT-2 (hidden 64): the CLI's quick check."""
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=256)
    return _seeded(lambda: transformers.GPT2LMHeadModel(config))
