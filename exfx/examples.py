"""Built-in example models for the ``exfx`` command and the docs.

Each factory returns ``(model, example_inputs)`` in eval mode, randomly
initialised from a fixed seed (no download, no data). A factory is named on the
command line as ``module:function``, e.g. ``exfx.examples:small_cnn``; your own
factories follow the same convention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["small_cnn", "mlp", "resnet_block_net", "SmallCNN"]


class SmallCNN(nn.Module):
    """A VGG-style CNN for 28x28 grey images (Fashion-MNIST sized): conv-BN-ReLU x3, two linears."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 7 * 7, 128), nn.ReLU(inplace=True),
                                        nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class _ResidualNet(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn0(self.stem(x)))
        out = F.relu(self.bn1(self.conv1(h)))
        out = F.relu(self.bn2(self.conv2(out)) + h)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _seeded(make: Callable[[], nn.Module], *shape: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``make()`` initialised from seed 0, without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make()
    generator = torch.Generator().manual_seed(0)
    return model.eval(), (torch.randn(*shape, generator=generator),)


def small_cnn() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """:class:`SmallCNN` with a batch of 8 random 1x28x28 images."""
    return _seeded(SmallCNN, 8, 1, 28, 28)


def mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A 784-256-256-10 MLP with a batch of 8 random inputs."""
    return _seeded(_MLP, 8, 784)


def resnet_block_net() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A stem and one residual basic block (64 channels), batch of 4 random 3x32x32 images."""
    return _seeded(_ResidualNet, 4, 3, 32, 32)
