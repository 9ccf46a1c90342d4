"""rotary: RoPE's written-out rotate_half becomes a roll against a sign-moved sin, equal bit for bit to eager; what
it cannot take is left alone."""
from __future__ import annotations

import pytest
import torch

import blade
from blade.passes import cleanup, rotary

B, H, S, D = 2, 4, 5, 8


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Rope(torch.nn.Module):
    """Hugging Face's apply_rotary_pos_emb for q and k, cos/sin computed from the positions (not constants)."""

    def __init__(self, spelling="hf"):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))
        self.spelling = spelling

    def forward(self, q, k, positions):
        freqs = positions[:, :, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        if self.spelling == "swapped":  # the other operand orders of the add and the multiplies
            return sin * rotate_half(q) + cos * q, rotate_half(k) * sin + k * cos
        if self.spelling == "read_twice":  # the rotated half is also returned: nothing to gain
            rotated = rotate_half(q)
            return q * cos + rotated * sin, rotated
        if self.spelling == "broadcast_sin":  # sin of one column: no halves to move the sign onto
            return q * cos + rotate_half(q) * sin[..., :1], k
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def example():
    return torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.randint(0, 100, (B, S))


def compiled(spelling):
    return blade.compile(Rope(spelling), example(), backend="eager", passes=[cleanup.run, rotary.run])


def counts(cm) -> dict:
    return cm.graph.count_targets()


@pytest.mark.parametrize("spelling", ["hf", "swapped"])
def test_each_rotation_becomes_one_roll_equal_bit_for_bit(spelling):
    cm = compiled(spelling)
    got = counts(cm)
    assert got.get("aten.roll.default") == 2, got
    assert got.get("aten.cat.default") == 2, got  # emb, and the one sign-moved sin both rotations share
    assert got.get("aten.neg.default") == 1, got
    record = next(p for p in cm.report.passes if p["name"] == "rotary")
    assert record["counts"]["rotate_half_rolled"] == 2
    for _ in range(3):
        inputs = example()
        for mine, theirs in zip(cm(*inputs), Rope(spelling)(*inputs)):
            assert torch.equal(mine, theirs)


@pytest.mark.parametrize("spelling", ["read_twice", "broadcast_sin"])
def test_what_it_cannot_take_is_left_alone(spelling):
    cm = compiled(spelling)
    plain = blade.compile(Rope(spelling), example(), backend="eager", passes=[cleanup.run])
    assert "aten.roll.default" not in counts(cm) and counts(cm) == counts(plain)
    inputs = example()
    for mine, theirs in zip(cm(*inputs), Rope(spelling)(*inputs)):
        assert torch.equal(mine, theirs)


def test_a_llama_decode_step_has_no_rotate_half_left():
    pytest.importorskip("transformers")
    from llm_models import family

    import blade.llm

    model = family("llama")
    lm = blade.llm.compile(model, max_batch=1, max_length=32)
    got = counts(lm.decode_program)
    assert got.get("aten.roll.default") == 2 * model.config.num_hidden_layers, got
    assert got.get("aten.neg.default") == 1, got  # the shared sign-moved sin's
