"""Shared pytest setup: ``tests/`` on ``sys.path`` (for ``models`` and ``helpers``), seeds, the ``slow`` marker."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in setup.cfg; registering twice is harmless and keeps `-m slow` working without it.
    config.addinivalue_line("markers",
                            'slow: over about 5 s; left out by default, run by .ci/run (-m "slow or not slow")')
    # The tests run thousands of tiny ops: intra-op threads only add synchronisation, and on a busy 2-core
    # runner OpenMP's spinning threads made the suite several times slower.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _reference_lowering() -> Iterator[None]:
    """Most tests check the rewrite's semantics (the ENP invariants, masks, FLOP counts), which the reference
    ops carry on every machine; what the default native lowering picks depends on timings. So the suite
    defaults to ``lowering="reference"`` through ``$EXFX_LOWERING``; the tests of the native default
    (test_dispatch, test_lower_pass, test_backend) remove the variable. Session-wide, so that module-scoped
    fixtures compile the same way as the tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EXFX_LOWERING", "reference")
        yield


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def built() -> bool:
    """The native kernels, built or loaded once per session: whether the C++ ones (not the fallback) run."""
    from exfx.ops import native

    return native.native_available()
