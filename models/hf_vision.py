"""Real vision and diffusion networks nobody on the project wrote, at their reference sizes and as tiny variants of
the same architectures: Hugging Face `transformers` image classifiers and a `diffusers` UNet, random weights
(nothing downloaded). Needs `transformers` and `diffusers` (the test extra); not in blade.models.names().

`get(name, size)` returns (model, example_inputs, dynamic_shapes): size "reference" is the published network
(ResNet-50, ConvNeXt-T, Swin-T, ...) at its image size; "tiny" keeps the architecture's blocks (bottlenecks,
depthwise convolutions, shifted windows, squeeze-excitation, attention) with fewer and narrower layers and a small
image, for the tests. Batch-norm statistics are calibrated (blade.models.hf.calibrate_batch_norm) so that the
outputs stay in the normal float range, as a trained network's do. Each factory is also a CLI spec:
`blade compile blade.models.hf_vision:resnet50`.
"""
from __future__ import annotations

import torch
from torch.export import Dim

from blade.models.hf import calibrate_batch_norm

# name -> (transformers config class, reference config kwargs, tiny config kwargs, model class, image size by size)
_CLASSIFIERS = {
    "resnet50": ("ResNetConfig", {}, dict(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1]),
                 "ResNetForImageClassification", {"reference": 224, "tiny": 64}),
    "convnext_tiny": ("ConvNextConfig", {}, dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1]),
                      "ConvNextForImageClassification", {"reference": 224, "tiny": 64}),
    "swin_tiny": ("SwinConfig", {}, dict(image_size=64, embed_dim=32, depths=[2, 2, 2], num_heads=[1, 2, 4],
                                         window_size=4),
                  "SwinForImageClassification", {"reference": 224, "tiny": 64}),
    "mobilenet_v2": ("MobileNetV2Config", {}, dict(image_size=64, depth_multiplier=0.35),
                     "MobileNetV2ForImageClassification", {"reference": 224, "tiny": 64}),
    "regnet_y_4gf": ("RegNetConfig", {}, dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                                              groups_width=8),
                     "RegNetForImageClassification", {"reference": 224, "tiny": 64}),
    "efficientnet_b0": ("EfficientNetConfig", dict(image_size=224, width_coefficient=1.0, depth_coefficient=1.0,
                                                   hidden_dim=1280, dropout_rate=0.2),
                        dict(image_size=64, width_coefficient=0.25, depth_coefficient=0.3, hidden_dim=320),
                        "EfficientNetForImageClassification", {"reference": 224, "tiny": 64}),
    "dinov2_small": ("Dinov2Config", dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536),
                     dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          image_size=56),
                     "Dinov2ForImageClassification", {"reference": 224, "tiny": 56}),
    "mobilevit_small": ("MobileViTConfig", {}, dict(image_size=64, hidden_sizes=[32, 48, 64],
                                                    neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 96]),
                        "MobileViTForImageClassification", {"reference": 256, "tiny": 64}),
}
DIFFUSION = ("ddpm_unet",)
NAMES = (*_CLASSIFIERS, *DIFFUSION)
SIZES = ("reference", "tiny")


def get(name: str, size: str = "reference", batch: int = 1, seed: int = 0):
    """(model in eval mode, example inputs of `batch`, dynamic_shapes) for network `name`: the batch dim dynamic when
    `batch` > 1, else None (torch.export specializes a dim whose example size is 1, so a dynamic batch of 1 would
    fail to capture)."""
    if name not in NAMES:
        raise ValueError(f"unknown network {name!r}; choose one of {list(NAMES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {list(SIZES)}")
    return ddpm_unet(size, batch, seed) if name == "ddpm_unet" else _classifier(name, size, batch, seed)


def sample_inputs(name: str, size: str = "reference", batch: int = 1, seed: int = 1) -> tuple:
    """Fresh inputs for network `name`, shaped like its example inputs but for `batch`."""
    if name == "ddpm_unet":
        return _unet_inputs(size, batch, torch.Generator().manual_seed(seed))
    pixels = _CLASSIFIERS[name][4][size]
    return (torch.randn(batch, 3, pixels, pixels, generator=torch.Generator().manual_seed(seed)),)


def _classifier(name: str, size: str, batch: int, seed: int):
    import transformers

    config_name, reference, tiny, model_name, pixels = _CLASSIFIERS[name]
    config = getattr(transformers, config_name)(num_labels=1000 if size == "reference" else 10,
                                                **(reference if size == "reference" else tiny))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config).eval()
    generator = torch.Generator().manual_seed(seed)
    image = pixels[size]
    calibrate_batch_norm(model, lambda: torch.randn(2, 3, image, image, generator=generator),
                         unit_scales=name == "efficientnet_b0")
    dynamic = ({0: Dim("batch", min=1, max=64)},) if batch > 1 else None
    return model, (torch.randn(batch, 3, image, image, generator=generator),), dynamic


def _unet_config(size: str) -> dict:
    """google/ddpm-cifar10-32's UNet (35.7 M parameters, self-attention at 16 x 16), or a tiny one like it."""
    if size == "reference":
        return dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=(128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    return dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                norm_num_groups=8, attention_head_dim=8,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def _unet_inputs(size: str, batch: int, generator: torch.Generator) -> tuple:
    pixels = _unet_config(size)["sample_size"]
    sample = torch.randn(batch, 3, pixels, pixels, generator=generator)
    timestep = torch.randint(0, 1000, (batch,), generator=generator)
    return sample, timestep


def ddpm_unet(size: str = "reference", batch: int = 1, seed: int = 0):
    """diffusers' UNet2DModel as DDPM's CIFAR-10 model has it: (noisy image, timestep per image) -> noise."""
    import diffusers

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = diffusers.UNet2DModel(**_unet_config(size)).eval()
    batch_dim = Dim("batch", min=1, max=32)  # torch.export finds a guard batch <= 63 in the timestep embedding
    dynamic = ({0: batch_dim}, {0: batch_dim}) if batch > 1 else None
    return model, _unet_inputs(size, batch, torch.Generator().manual_seed(seed)), dynamic


def _factory(name: str):
    def factory(size: str = "reference", batch: int = 1):
        return get(name, size, batch)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{name} (blade.models.hf_vision.get({name!r}, size, batch))."
    return factory


for _name in _CLASSIFIERS:
    globals()[_name] = _factory(_name)
