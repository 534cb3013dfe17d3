"""The built-in example models (exfx.examples)."""

from __future__ import annotations

import pytest
import torch

from exfx.examples import mlp, resnet_block_net, small_cnn


@pytest.mark.parametrize("factory", [small_cnn, mlp, resnet_block_net])
def test_factories_are_deterministic_and_leave_the_callers_rng_alone(factory) -> None:
    """They used to call torch.manual_seed(0), resetting the caller's global RNG."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first_model, first_inputs = factory()
    assert torch.equal(torch.rand(3), expected)
    second_model, second_inputs = factory()
    assert all(torch.equal(a, b) for a, b in zip(first_model.state_dict().values(),
                                                 second_model.state_dict().values()))
    assert torch.equal(first_inputs[0], second_inputs[0])
