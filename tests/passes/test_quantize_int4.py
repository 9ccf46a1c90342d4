"""int4 weight-only: the packing the op specifies, the kernel against the reference, the pass's rewrite, and a
compiled model equal to the same model with its weights dequantized."""
from __future__ import annotations

import pytest
import torch

import blade
from blade.backends.kernels import registry, skinny_native
from blade.errors import ShapeError
from blade.ops.quantized import (Q4LINEAR, QEMBEDDING, QLINEAR, dequantize_int4, q4linear_reference, quantize_int4,
                                 quantize_table)
from blade.passes import cleanup, quantize


def rel(a, b) -> float:
    err = float((a.double() - b.double()).norm() / b.double().norm())
    assert err == err, "NaN"
    return err


def test_packing_is_the_ops_layout():
    q = torch.arange(-8, 8).repeat(4)[None].float()  # one row of 64: two groups of 32 weights
    packed, scales = quantize_int4(q * 0.5)
    assert scales.shape == (1, 2) and torch.allclose(scales, torch.full((1, 2), 8 * 0.5 / 7))
    codes = torch.round(q * 0.5 / scales.repeat_interleave(32, 1)).clamp(-8, 7).to(torch.int16) + 8
    byte = packed[0, 3].item()  # chunk 0, byte 3: weight 3 low, weight 19 high
    assert byte & 0x0F == codes[0, 3] and byte >> 4 == codes[0, 19]
    assert torch.allclose(dequantize_int4(packed, scales), codes.float().sub(8) * scales.repeat_interleave(32, 1))


def test_quantization_error_is_that_of_4_bits_and_zero_groups_stay_zero():
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    w[3, 32:64] = 0
    packed, scales = quantize_int4(w, group=128)
    back = dequantize_int4(packed, scales)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 128) and scales.shape == (48, 2)
    assert rel(back, w) < 0.15 and torch.equal(back[3, 32:64], torch.zeros(32))


@pytest.mark.skipif(skinny_native.KERNEL_Q4.function() is None, reason=f"{skinny_native.KERNEL_Q4.reason}")
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_the_kernel_equals_the_reference(rows, group):
    gen = torch.Generator().manual_seed(rows + group)
    packed, scales = quantize_int4(torch.randn(77, 256, generator=gen), group)  # 77 rows: a partial block
    x, bias = torch.randn(rows, 256, generator=gen), torch.randn(77, generator=gen)
    assert skinny_native.supports_q4(x, packed, scales, bias)
    for b in (bias, None):
        # the kernel's weights are the reference's dequantized ones: only the order of the fp32 sums differs
        assert rel(skinny_native.q4linear(x, packed, scales, b), q4linear_reference(x, packed, scales, b)) < 1e-6
    chosen = registry.choose("q4linear", "cpu", x, packed, scales, bias)
    assert chosen is not q4linear_reference
    wide = torch.randn(skinny_native.MAX_QUANTIZED_ROWS + 1, 256)  # past its rows the reference runs
    assert registry.choose("q4linear", "cpu", wide, packed, scales, None) is registry.REFERENCES["q4linear"].run


@pytest.mark.skipif(skinny_native.KERNEL_Q4.function() is None, reason=f"{skinny_native.KERNEL_Q4.reason}")
def test_the_kernel_takes_rows_of_any_number_of_groups():  # one row of x: the sequential path
    gen = torch.Generator().manual_seed(3)
    packed, scales = quantize_int4(torch.randn(9, 32 * 521, generator=gen), 32)  # 521 groups a row: 4 a step, 1 left
    x = torch.randn(1, 32 * 521, generator=gen)
    assert skinny_native.supports_q4(x, packed, scales)
    assert rel(skinny_native.q4linear(x, packed, scales), q4linear_reference(x, packed, scales)) < 1e-5  # long sums


def test_bad_calls_name_the_argument():
    packed, scales = quantize_int4(torch.randn(8, 64))
    with pytest.raises(ShapeError, match="x has 60 features"):
        q4linear_reference(torch.randn(2, 60), packed, scales)
    with pytest.raises(ShapeError, match="scales must be"):
        q4linear_reference(torch.randn(2, 64), packed, scales[:, :1].repeat(1, 3))
    with pytest.raises(ShapeError, match="not a multiple of the group size"):
        quantize_int4(torch.randn(8, 48))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 64)
        self.up = torch.nn.Linear(64, 96)
        self.odd = torch.nn.Linear(96, 40)  # 96 in: a multiple of 32
        self.down = torch.nn.Linear(40, 8)  # 40 in: not one, so int8

    def forward(self, ids):
        return self.down(torch.relu(self.odd(torch.relu(self.up(self.embed(ids))))))


def dequantized_net() -> Net:
    """Net with every weight as int4 (or int8 rows / int8 per channel) stores it: what the compile must equal."""
    net = Net().eval()
    with torch.no_grad():
        for layer in (net.up, net.odd):
            layer.weight.copy_(dequantize_int4(*quantize_int4(layer.weight)))
        q, s = quantize_table(net.down.weight)
        net.down.weight.copy_(q.float() * s[:, None])
        q, s = quantize_table(net.embed.weight)
        net.embed.weight.copy_(q.float() * s[:, None])
    return net


@pytest.mark.parametrize("backend", ["eager", "onnxruntime", "triton"])
def test_the_pass_packs_what_it_can_and_equals_the_dequantized_model(backend):
    ids = torch.randint(0, 50, (2, 5))
    cm = blade.compile(Net().eval(), (ids,), backend=backend, passes=[cleanup.run, quantize.run],
                       quantize="int4_weight_only", check_accuracy=False)
    q4 = [n for n in cm.graph.call_nodes if n.target == Q4LINEAR]
    assert len(q4) == 2 and all(n.args[1].dtype == torch.uint8 for n in q4)
    assert [n.args[1].dtype for n in cm.graph.call_nodes if n.target == QLINEAR] == [torch.int8]
    assert [n for n in cm.graph.call_nodes if n.target == QEMBEDDING]
    record = next(p for p in cm.report.passes if p["name"] == "quantize")
    assert record["counts"]["q4linear"] == 2 and any("not int4" in note for note in record.get("notes", []))
    fresh = torch.randint(0, 50, (2, 5))
    assert rel(cm(fresh), dequantized_net()(fresh)) < 1e-5
