"""blade.llm: compile a causal LM for generation (prefill + decode over an in-place static KV cache).

    lm = blade.llm.compile(model, max_batch=4, max_length=512)
    tokens = lm.generate(input_ids, attention_mask, max_new_tokens=128)
    outputs = lm.serve([(prompt_ids, 64), (other_ids, 200)])   # in-flight batching (blade.llm.Engine)
    lm.save("lm.blade"); lm = blade.llm.load("lm.blade")        # no model code, the weights once
"""
from blade.llm.compiled import CompiledLM, GenerationStats, compile_lm as compile  # noqa: F401
from blade.llm.engine import Engine  # noqa: F401
from blade.llm.sampling import Sampling  # noqa: F401
from blade.llm.saved import load  # noqa: F401

__all__ = ["CompiledLM", "Engine", "GenerationStats", "Sampling", "compile", "load"]
