"""ReLU gates and their sparsity (spec Eq. 5, 8) against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from remoe_patches.routing import relu_gates

from routing_references import E, T, logits_away_from_zero


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


@pytest.mark.parametrize("scale", [None, 0.25])
def test_penalty_gradient_equals_autograd_through_the_penalty(scale):
    """relu_gates_with_penalty: the forward is Eq. 5; the backward is that of
    ``upstream + s * sum_te p_e R_te`` computed by autograd, zero where the gate is zero."""
    logits = logits_away_from_zero().requires_grad_()
    upstream_TE = torch.randn(T, E, dtype=logits.dtype, generator=torch.Generator().manual_seed(3))
    penalty_grad_E = torch.rand(E, dtype=logits.dtype) + 0.1
    scale_tensor = None if scale is None else torch.tensor(scale, dtype=logits.dtype)

    gates = relu_gates.relu_gates_with_penalty(logits, penalty_grad_E, lambda: scale_tensor)
    assert torch.equal(gates, torch.relu(logits.detach()))
    (got,) = torch.autograd.grad((gates * upstream_TE).sum(), logits)

    plain = relu_gates.relu_gates(logits)
    s = 1.0 if scale is None else scale
    objective = (plain * upstream_TE).sum() + s * (plain * penalty_grad_E).sum()
    (expected,) = torch.autograd.grad(objective, logits)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert (got[logits.detach() <= 0] == 0).all()


def test_penalty_scale_is_read_in_the_backward_pass():
    """megatron sets the loss scale after the forward of a micro-batch: the value read is the one
    at backward time."""
    logits = logits_away_from_zero().requires_grad_()
    holder = {"scale": torch.tensor(1.0, dtype=logits.dtype)}
    gates = relu_gates.relu_gates_with_penalty(
        logits, torch.ones(E, dtype=logits.dtype), lambda: holder["scale"]
    )
    holder["scale"] = torch.tensor(3.0, dtype=logits.dtype)
    (grad,) = torch.autograd.grad(gates.sum() * 0, logits)
    active = logits.detach() > 0
    torch.testing.assert_close(grad, torch.where(active, 3.0, 0.0).to(grad.dtype))
