"""Small random-weight causal LMs of each family blade.llm supports, and left-padded prompts, for tests/llm."""
from __future__ import annotations

import torch

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
             max_position_embeddings=128)


def family(name: str) -> torch.nn.Module:
    """A small random-weight model of one family (RoPE, GQA, SwiGLU, tied embeddings, partial rotary, parallel
    residual between them)."""
    import transformers as t
    configs = {
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512,
                                                       n_positions=128)),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**SMALL, num_key_value_heads=2)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**SMALL, num_key_value_heads=2,
                                                                 sliding_window=None)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**SMALL, num_key_value_heads=1,
                                                          tie_word_embeddings=True)),
        "phi": lambda: t.PhiForCausalLM(t.PhiConfig(**SMALL, partial_rotary_factor=0.5)),
        "gpt_neox": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**SMALL, rotary_pct=0.25)),
    }
    torch.manual_seed(0)
    model = configs[name]().eval()
    with torch.no_grad():  # sharper logits than the 0.02 init: greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return model


def left_padded(batch: int, lengths: list[int], vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, vocab, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask
