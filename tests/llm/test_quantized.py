"""blade.llm with weight-only int4: greedy tokens equal Hugging Face generate on the same model with its weights
replaced by what the compile stores (int4 groups for every linear, int8 rows for the embedding table)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import blade.llm  # noqa: E402
from blade.ops.quantized import Q4LINEAR, dequantize_int4, quantize_int4, quantize_table  # noqa: E402
from llm_models import family, left_padded  # noqa: E402


def test_int4_generate_equals_hf_on_the_dequantized_weights():
    model = family("llama")
    lm = blade.llm.compile(model, max_batch=2, max_length=48, quantize="int4_weight_only", check_accuracy=False)
    layers = [n for n in lm.decode_program.graph.call_nodes if n.target == Q4LINEAR]
    # per block q|k|v and gate|up (joined by the horizontal pass), o, down; and the head
    assert len(layers) == 2 * 4 + 1, f"{len(layers)} int4 layers"
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(dequantize_int4(*quantize_int4(module.weight)))
        table = model.get_input_embeddings().weight
        q, scale = quantize_table(table)
        table.copy_(q.float() * scale[:, None])
    ids, mask = left_padded(2, [7, 4], 512, 21)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=12, pad_token_id=0), want)
