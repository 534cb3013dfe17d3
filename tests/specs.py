"""``module:factory`` specs used by the CLI and graph-diff tests (importable with tests/ on sys.path)."""

from __future__ import annotations

import torch
import torch.nn as nn


def _mlp(hidden: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    return model.eval(), (torch.randn(4, 16),)


def mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    return _mlp(64)


def mlp_widened() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The same MLP with its second layer widened from 64 to 96 units."""
    return _mlp(96)


def not_a_pair() -> int:
    return 3
