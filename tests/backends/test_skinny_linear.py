"""blade's skinny CPU linear kernel (decode steps): equal to PyTorch's linear on 1..8 rows of fp32/bf16 x with fp32,
bf16 or int8 weights; the registry picks it only for the calls it takes; linear_form gives it every layer."""
from __future__ import annotations

import pytest
import torch

from blade.backends.kernels import registry, skinny_native

pytestmark = pytest.mark.skipif(skinny_native.library() is None, reason=f"{skinny_native.unavailable_reason()}")


def rel(a, b):
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert err == err, "NaN"
    return err


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("kind", [torch.float32, torch.bfloat16, torch.int8])
def test_equal_to_torch_linear(rows, kind):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 301, generator=gen)  # a width that is not a multiple of 16 exercises the tail
    bias = torch.randn(77, generator=gen)
    if kind == torch.int8:
        weight = torch.randint(-127, 128, (77, 301), dtype=torch.int8, generator=gen)
        scale = torch.rand(77, generator=gen)
        want = torch.nn.functional.linear(x, weight.float() * scale[:, None], bias)
    else:
        weight, scale = torch.randn(77, 301, generator=gen).to(kind), None
        want = torch.nn.functional.linear(x, weight.float(), bias)
    assert skinny_native.supports(x, weight, bias, scale)
    assert rel(skinny_native.linear(x, weight, bias, scale), want) < 1e-6


def test_bf16_activations_give_bf16_results():
    x = torch.randn(2, 1, 64).bfloat16()
    weight = torch.randn(32, 64).bfloat16()
    got = skinny_native.linear(x, weight)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 1, 32)
    assert rel(got, torch.nn.functional.linear(x.float(), weight.float())) < 1e-2


needs_bf16_dot = pytest.mark.skipif(not skinny_native.uses_bf16_dot(torch.ones(1, 32).bfloat16(),
                                                                 torch.ones(1, 32).bfloat16(), None),
                                    reason="this CPU has no AVX512-BF16")


@needs_bf16_dot
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_model_calls_take_the_bf16_dot_path_and_round_as_torch(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 301, generator=gen).bfloat16()  # 301: 9 steps of 32 and a tail of 13
    weight = torch.randn(77, 301, generator=gen).bfloat16()
    b = torch.randn(77, generator=gen).bfloat16() if bias else None
    got = skinny_native.linear(x, weight, b)
    exact = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 77)
    assert rel(got, exact) < 4e-3  # the final bf16 rounding: half a bf16 ulp is 2^-9
    assert (got == exact.bfloat16()).float().mean() > 0.95  # the rest: fp32 sums in another order


@needs_bf16_dot
def test_bf16_dot_path_keeps_nan_and_ignores_a_non_contiguous_x():
    weight = torch.randn(16, 64).bfloat16()
    x = torch.randn(2, 64).bfloat16()
    x[1, 5] = float("nan")
    got = skinny_native.linear(x, weight)
    assert torch.isnan(got[1]).all() and not torch.isnan(got[0]).any()
    wide = torch.randn(2, 128).bfloat16()[:, ::2]
    assert not skinny_native.uses_bf16_dot(wide, weight, None)
    assert rel(skinny_native.linear(wide, weight), torch.nn.functional.linear(wide.float(), weight.float())) < 1e-2


def test_the_registry_takes_only_what_the_kernel_takes():
    weight = torch.randn(16, 32)
    assert registry.choose("linear", "cpu", torch.randn(8, 32), weight, None) is not torch.nn.functional.linear
    refused = [(torch.randn(9, 32), weight), (torch.randn(4, 32).double(), weight.double()),
               (torch.randn(2, 32), torch.randn(32, 16).t()), (torch.randn(2, 32).half(), weight.half())]
    for x, w in refused:
        assert registry.choose("linear", "cpu", x, w, None) is torch.nn.functional.linear, (x.shape, x.dtype)
    many = torch.randn(9, 32)
    assert torch.equal(registry.linear(many, weight), torch.nn.functional.linear(many, weight))


def test_linear_form_rewrites_conv1d_addmm_and_the_eager_backend_runs_it():
    import blade

    class Conv1D(torch.nn.Module):  # Hugging Face GPT-2's layer: addmm(bias, x, W[in, out])
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(32, 48))
            self.bias = torch.nn.Parameter(torch.randn(48))
            self.proj = torch.nn.Parameter(torch.randn(48, 16))

        def forward(self, x):
            hidden = torch.addmm(self.bias, x.view(-1, 32), self.weight)
            return torch.mm(hidden, self.proj).view(*x.shape[:-1], 16)

    model = Conv1D().eval()
    x = torch.randn(1, 3, 32)
    from blade.passes import linear_form, pipeline_for

    compiled = blade.compile(model, (x,), backend="eager", cache=False,
                             passes=[linear_form.run, *pipeline_for(2)])
    counts = compiled.graph.count_targets()
    assert counts.get("aten.linear.default") == 2 and "aten.addmm.default" not in counts, counts
    fresh = torch.randn(1, 3, 32)
    assert rel(compiled(fresh), model(fresh)) < 1e-6


@pytest.mark.parametrize("rows", [9, 20, 128])
def test_quantized_weights_take_a_prefill_of_rows_8_a_pass(rows):
    from blade.ops.quantized import q4linear_reference, quantize_int4

    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows // 2, 64, generator=gen) if rows % 2 == 0 else torch.randn(rows, 64, generator=gen)
    weight = torch.randint(-127, 128, (40, 64), dtype=torch.int8, generator=gen)
    scale, bias = torch.rand(40, generator=gen), torch.randn(40, generator=gen)
    assert skinny_native.supports(x, weight, bias, scale)
    want = torch.nn.functional.linear(x, weight.float() * scale[:, None], bias)
    assert rel(skinny_native.linear(x, weight, bias, scale), want) < 1e-6
    packed, scales = quantize_int4(torch.randn(40, 64, generator=gen), 32)
    assert skinny_native.supports_q4(x, packed, scales, bias)
    assert rel(skinny_native.q4linear(x, packed, scales, bias), q4linear_reference(x, packed, scales, bias)) < 1e-5


def test_beyond_the_row_limits_the_reference_runs():
    weight = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    assert not skinny_native.supports(torch.randn(skinny_native.MAX_QUANTIZED_ROWS + 1, 32), weight, None,
                                      torch.rand(16))
    assert not skinny_native.supports(torch.randn(skinny_native.MAX_ROWS + 1, 32), weight.float())


def test_an_input_copied_for_the_call_keeps_the_result_in_its_dtype():
    """x that is not contiguous fp32 (bf16, or a strided view) is copied for the kernel; y is in x's dtype."""
    from blade.ops.quantized import dequantize_int4, quantize_int4

    weight = torch.randn(16, 64)
    packed, scales = quantize_int4(weight, 32)
    for x in (torch.randn(2, 64).bfloat16(), torch.randn(2, 128)[:, ::2]):
        got = skinny_native.linear(x, weight)
        assert got.dtype == x.dtype and rel(got.float(), torch.nn.functional.linear(x.float(), weight)) < 1e-2
        got = skinny_native.q4linear(x, packed, scales)
        want = torch.nn.functional.linear(x.float(), dequantize_int4(packed, scales))
        assert got.dtype == x.dtype and rel(got.float(), want) < 1e-2
