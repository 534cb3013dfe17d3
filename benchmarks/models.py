"""Benchmark model definitions (CIFAR-style architectures, as in the ExPrune paper)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BasicBlock", "ResNet18", "VGG11", "resnet18_cifar", "build_model", "MODELS"]


class BasicBlock(nn.Module):
    """The ResNet basic block: conv-BN-ReLU, conv-BN, + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), base width 64 by default."""

    def __init__(self, in_channels: int = 3, classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet18_cifar() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A factory for the ``exfx`` command: random-init ResNet-18, batch of 2 CIFAR-sized images."""
    torch.manual_seed(0)
    return ResNet18().eval(), (torch.randn(2, 3, 32, 32),)


class VGG11(nn.Module):
    """VGG-11 for 32x32 inputs with BatchNorm after every conv, as the paper's CIFAR VGG-11 (base width 64)."""

    PLAN = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")

    def __init__(self, in_channels: int = 3, classes: int = 10, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in self.PLAN:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            cout = width * int(item)
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


#: name -> (constructor taking in_channels, classes, width; input side)
MODELS = {"vgg11": (VGG11, 32), "resnet18": (ResNet18, 32)}


def build_model(name: str, width: int, in_channels: int = 1, classes: int = 10) -> nn.Module:
    constructor, _ = MODELS[name]
    return constructor(in_channels=in_channels, classes=classes, width=width)
