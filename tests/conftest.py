"""Shared pytest setup: ``tests/`` on ``sys.path`` (for ``models`` and ``helpers``), seeds, the ``slow`` marker."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in setup.cfg; registering twice is harmless and keeps `-m slow` working without it.
    config.addinivalue_line("markers", "slow: long-running tests, excluded by default (run with -m slow)")
    # The tests run thousands of tiny ops: intra-op threads only add synchronisation, and on a busy 2-core
    # runner OpenMP's spinning threads made the suite several times slower.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
