"""Real Hugging Face models nobody on the project wrote, one test per bug they found: MobileViT-small at its
reference size as HF initializes it (subnormal outputs: the float64 referee), and left-padded causal LMs on ONNX
Runtime (attention rows the mask closes: NaN through MultiHeadAttention, the values' mean through torch.onnx's SDPA).
The defaults tier (tests/test_defaults.py) compiles MobileViT-small with realistic batch-norm statistics."""
import pytest
import torch
import torch.nn.functional as F

import blade
from blade.perf.accuracy import relative_error

transformers = pytest.importorskip("transformers")


def test_mobilevit_as_hf_initializes_it_compiles_no_less_accurate_than_eager():
    """Its outputs are about 1e-40, where fp32 keeps a few bits: plain ONNX Runtime is 0.12 from eager and eager
    0.14 from the float64 answer. blade compiles it (all nine attentions substituted) and says why it passes."""
    from blade.models import hf

    model, example, _ = hf.mobilevit_small_hf_init()
    compiled = blade.compile(model, example, backend="onnxruntime")
    attention = next(r for r in compiled.report.passes if r["name"] == "attention")
    assert attention["counts"]["attention_replaced"] == 9
    accuracy = compiled.report.accuracy
    assert accuracy.ok and compiled.report.bisection == {} and len(accuracy.refereed) == 2
    for output in accuracy.outputs:
        assert output.rel_err > 1e-2, "fp32 cannot hold 1e-5 on this model"
        assert output.exact_rel_err <= 2 * output.eager_exact_rel_err
    assert "ok against the float64 answer" in str(compiled.report)


class Attention(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("optimize", [0, 2])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_onnxruntime_attention_gives_zeros_where_the_mask_closes_a_row(optimize, kind):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=gen) for _ in range(3))
    allowed = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    allowed[1, :, :2] = False  # the first two queries of the second sequence see no key
    mask = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    compiled = blade.compile(Attention(), (q, k, v, mask), backend="onnxruntime", optimize=optimize,
                             check_accuracy=False)
    assert compiled.report.backend_details["nodes"]["torch"] == 0
    out = compiled(q, k, v, mask)
    assert not out.isnan().any() and torch.equal(out[1, :, :2], torch.zeros(2, 2, 8))
    assert relative_error(out, Attention()(q, k, v, mask)) <= 1e-5


def _llama():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, use_cache=False)
        return transformers.LlamaForCausalLM(config).eval()


def test_a_left_padded_batch_on_onnxruntime_matches_eager():
    """Compiled on a batch without padding (the usual example), run on a left-padded one: it was NaN everywhere."""
    model = _llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    full = torch.ones(2, 16, dtype=torch.long)
    compiled = blade.compile(model, (), example_kwargs={"input_ids": ids, "attention_mask": full},
                             backend="onnxruntime")
    assert compiled.backend == "onnxruntime" and compiled.report.bisection == {}
    left = full.clone()
    left[1, :5] = 0
    got = compiled(input_ids=ids, attention_mask=left).logits
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=left).logits
    assert not got.isnan().any() and relative_error(got, want) <= 1e-5
