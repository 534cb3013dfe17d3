"""The benchmarks' CIFAR-style architectures (as in the ExPrune paper), by name; defined in :mod:`exfx.examples`."""

from __future__ import annotations

import torch
import torch.nn as nn

from exfx.examples import ResNet18, VGG11

__all__ = ["resnet18_cifar", "build_model", "MODELS"]


def resnet18_cifar() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A factory for the ``exfx`` command: random-init ResNet-18, batch of 2 CIFAR-sized images."""
    torch.manual_seed(0)
    return ResNet18().eval(), (torch.randn(2, 3, 32, 32),)


#: name -> (constructor taking in_channels, classes, width; input side)
MODELS = {"vgg11": (VGG11, 32), "resnet18": (ResNet18, 32)}


def build_model(name: str, width: int, in_channels: int = 1, classes: int = 10) -> nn.Module:
    constructor, _ = MODELS[name]
    return constructor(in_channels=in_channels, classes=classes, width=width)
