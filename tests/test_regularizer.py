"""AdaptiveL1 (spec Eq. 7/8): scripted updates, the tie rule, the step reduction, state."""

from __future__ import annotations

import math

import pytest
import torch

from remoe_patches.regularizer import AdaptiveL1


def test_scripted_sparsity_sequence_with_tie():
    reg = AdaptiveL1(target_sparsity=0.875, num_layers=1, init_coeff=1e-8, multiplier=1.2)
    sparsities = [0.5, 0.6, 0.9, 0.875, 0.874, 1.0]
    # too dense -> *alpha; too sparse or exactly at target -> /alpha
    exponents = [+1, +1, -1, -1, +1, -1]
    expected = 1e-8
    for sparsity, exponent in zip(sparsities, exponents):
        reg.update(torch.tensor(sparsity))
        expected *= 1.2 ** exponent
        assert reg.coeff.item() == pytest.approx(expected, rel=1e-6)
    assert reg.coeff.dtype == torch.float32 and reg.coeff.dim() == 0


def test_step_sparsity_averages_micro_batches_then_moe_layers():
    reg = AdaptiveL1(target_sparsity=0.5, num_layers=4)
    # layers 1 and 3 are MoE (two micro-batches each); 2 and 4 are dense and never record
    for value_1, value_3 in [(0.2, 0.6), (0.4, 1.0)]:
        reg.record(1, torch.tensor(value_1))
        reg.record(3, torch.tensor(value_3))
    step = reg.step_sparsity()
    assert step.per_layer_L[0].item() == pytest.approx(0.3)
    assert step.per_layer_L[2].item() == pytest.approx(0.8)
    assert math.isnan(step.per_layer_L[1].item()) and math.isnan(step.per_layer_L[3].item())
    assert step.mean.item() == pytest.approx((0.3 + 0.8) / 2)
    # the records are consumed: the next step starts empty
    reg.record(1, torch.tensor(1.0))
    assert reg.step_sparsity().mean.item() == pytest.approx(1.0)


def test_finish_step_updates_from_the_reduced_value():
    reg = AdaptiveL1(target_sparsity=0.875, num_layers=2, init_coeff=1.0, multiplier=2.0)
    reg.record(1, torch.tensor(0.9))
    reg.record(2, torch.tensor(0.8))  # mean 0.85 < 0.875: too dense
    reg.finish_step()
    assert reg.coeff.item() == 2.0


def test_state_round_trip():
    reg = AdaptiveL1(target_sparsity=0.75, num_layers=2, init_coeff=3e-4, multiplier=1.3)
    reg.update(torch.tensor(0.1))
    restored = AdaptiveL1(target_sparsity=0.5, num_layers=2, init_coeff=1.0, multiplier=1.1)
    restored.load_state_dict(reg.state_dict())
    assert restored.coeff.item() == reg.coeff.item()
    assert (restored.multiplier, restored.target_sparsity) == (1.3, 0.75)
    # the saved state is a copy, not a view of the live coefficient
    state = reg.state_dict()
    reg.update(torch.tensor(0.1))
    assert state["coeff"].item() != reg.coeff.item()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(target_sparsity=1.0), "target_sparsity"),
        (dict(target_sparsity=0.5, multiplier=1.0), "multiplier"),
        (dict(target_sparsity=0.5, init_coeff=0.0), "init_coeff"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"AdaptiveL1.{field}"):
        AdaptiveL1(num_layers=1, **kwargs)
