"""blade.llm: compile a causal LM for generation (prefill + decode over an in-place static KV cache).

    lm = blade.llm.compile(model, max_batch=4, max_length=512)
    tokens = lm.generate(input_ids, attention_mask, max_new_tokens=128)
"""
from blade.llm.compiled import CompiledLM, GenerationStats, compile_lm as compile  # noqa: F401
from blade.llm.sampling import Sampling  # noqa: F401

__all__ = ["CompiledLM", "GenerationStats", "Sampling", "compile"]
