"""Real networks nobody on the project wrote: Hugging Face `transformers` architectures at their reference sizes,
random weights (nothing downloaded). Needs `transformers` (the test extra); not in blade.models.names().

Each factory returns (model, example_inputs, dynamic_shapes), so `blade compile blade.models.hf:mobilevit_small`
works from the command line too.

Hugging Face's random init leaves a CNN's batch-norm statistics at mean 0, variance 1, so activations shrink layer
by layer: MobileViT-small's outputs end near 1e-40, subnormal floats where fp32 keeps a few bits and eager itself is
0.14 from the float64 answer. A trained network's statistics match its activations; `calibrate_batch_norm` gives a
random one the same (the running statistics of a few random batches), which keeps outputs in the normal range.
"""
from __future__ import annotations

import torch
from torch import nn


def calibrate_batch_norm(model: nn.Module, make_batch, batches: int = 3, unit_scales: bool = False) -> nn.Module:
    """Set every batch norm's running statistics to those of `batches` inputs from make_batch() (a tensor, or
    (args, kwargs)), as training would have; with `unit_scales`, scales that HF draws near zero (EfficientNet's,
    from N(0, 0.02)) become 1 first. The model comes back in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        if unit_scales and norm.weight is not None and float(norm.weight.detach().abs().mean()) < 0.1:
            with torch.no_grad():
                norm.weight.fill_(1.0)
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches
    model.train()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)  # dropout draws in train mode: the same statistics in every process
        for _ in range(batches):
            batch = make_batch()
            args, kwargs = batch if isinstance(batch, tuple) else ((batch,), {})
            model(*args, **kwargs)
    return model.eval()


def mobilevit_small(calibrated: bool = True, batch: int = 1):
    """MobileViT-small (transformers' MobileViTConfig defaults: 5.6 M parameters, 256 x 256 images, nine
    attention layers in three transformer blocks); batch-norm statistics calibrated unless `calibrated` is False."""
    import transformers

    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.MobileViTModel(transformers.MobileViTConfig()).eval()
    if calibrated:
        calibrate_batch_norm(model, lambda: torch.randn(2, 3, 256, 256, generator=generator))
    return model, (torch.randn(batch, 3, 256, 256, generator=generator),), None


def mobilevit_small_hf_init():
    """MobileViT-small exactly as Hugging Face initializes it: subnormal outputs (see the module docstring)."""
    return mobilevit_small(calibrated=False)
