"""A ResNet of basic blocks (ResNet-18-like at base size) on [batch, 3, H, W] images."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._layers import randomize_norms
from ._workload import BATCH, InputSpec, Workload, normal, select


@dataclass(frozen=True)
class ResNetConfig:
    image_size: int
    widths: tuple[int, ...]  # channels of each stage; every stage after the first halves H and W
    blocks_per_stage: tuple[int, ...]
    n_classes: int
    imagenet_stem: bool  # 7x7/2 conv + 3x3/2 max-pool for large images; a single 3x3 conv for 32x32


CONFIGS = {
    "tiny": ResNetConfig(image_size=32, widths=(8, 16), blocks_per_stage=(1, 1), n_classes=10,
                         imagenet_stem=False),
    "base": ResNetConfig(image_size=224, widths=(64, 128, 256, 512), blocks_per_stage=(2, 2, 2, 2),
                         n_classes=1000, imagenet_stem=True),
}


def conv_bn(n_in: int, n_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(n_in, n_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(n_out),
    )


class BasicBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(n_in, n_out, 3, stride)
        self.conv2 = conv_bn(n_out, n_out, 3)
        self.shortcut = conv_bn(n_in, n_out, 1, stride) if stride != 1 or n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, config: ResNetConfig):
        super().__init__()
        if config.imagenet_stem:
            self.stem = nn.Sequential(conv_bn(3, config.widths[0], 7, stride=2), nn.ReLU(),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        else:
            self.stem = nn.Sequential(conv_bn(3, config.widths[0], 3), nn.ReLU())
        blocks = []
        n_in = config.widths[0]
        for stage, (width, n_blocks) in enumerate(zip(config.widths, config.blocks_per_stage)):
            for i in range(n_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(n_in, width, stride))
                n_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(n_in, config.n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(images))
        return self.fc(features.mean(dim=(2, 3)))


def build(config: ResNetConfig) -> nn.Module:
    model = ResNet(config)
    randomize_norms(model)
    return model


def workload(size: str = "tiny") -> Workload:
    config = select(CONFIGS, size)
    return Workload(
        build=lambda: build(config),
        inputs=(InputSpec("images", ("batch", 3, config.image_size, config.image_size), normal()),),
        dims={"batch": BATCH},
    )


def tiny():
    return workload("tiny").triple()


def base():
    return workload("base").triple()
