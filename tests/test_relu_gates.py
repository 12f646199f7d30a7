"""ReLU gates and their sparsity (spec Eq. 5, 8) against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from remoe_patches import relu_gates

T, E, K = 37, 8, 2


def logits_away_from_zero(seed=0, dtype=torch.float64):
    """Logits with |x| >= 0.05, so ReLU's kink never sits inside a finite-difference step."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, E, generator=gen, dtype=dtype)
    return torch.where(x.abs() < 0.05, torch.sign(x) * 0.05 + x, x)


def test_relu_gates_is_elementwise_max_with_zero():
    x = logits_away_from_zero().numpy()
    expected = np.where(x > 0, x, 0.0)
    np.testing.assert_array_equal(relu_gates.relu_gates(torch.from_numpy(x)).numpy(), expected)


def test_sparsity_counts_zero_gates():
    gates = relu_gates.relu_gates(logits_away_from_zero())
    zeros = sum(1 for t in range(T) for e in range(E) if gates[t, e].item() == 0.0)
    assert relu_gates.sparsity(gates).item() == pytest.approx(zeros / (T * E))


def test_all_zero_and_all_active_layers():
    assert relu_gates.sparsity(torch.zeros(4, E)).item() == 1.0
    assert relu_gates.sparsity(torch.ones(4, E)).item() == 0.0
