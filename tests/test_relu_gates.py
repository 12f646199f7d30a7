"""The routing math of remoe_patches.routing against independent computations (spec §1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from remoe_patches import routing

T, E, K = 37, 8, 2


def logits_away_from_zero(seed=0, dtype=torch.float64):
    """Logits with |x| >= 0.05, so ReLU's kink never sits inside a finite-difference step."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, E, generator=gen, dtype=dtype)
    return torch.where(x.abs() < 0.05, torch.sign(x) * 0.05 + x, x)


def test_relu_gates_is_elementwise_max_with_zero():
    x = logits_away_from_zero().numpy()
    expected = np.where(x > 0, x, 0.0)
    np.testing.assert_array_equal(routing.relu_gates(torch.from_numpy(x)).numpy(), expected)


def test_sparsity_counts_zero_gates():
    gates = routing.relu_gates(logits_away_from_zero())
    zeros = sum(1 for t in range(T) for e in range(E) if gates[t, e].item() == 0.0)
    assert routing.sparsity(gates).item() == pytest.approx(zeros / (T * E))


def test_all_zero_and_all_active_layers():
    assert routing.sparsity(torch.zeros(4, E)).item() == 1.0
    assert routing.sparsity(torch.ones(4, E)).item() == 0.0


def test_l1_loss_is_mean_token_l1_norm():
    gates = routing.relu_gates(logits_away_from_zero())
    expected = sum(abs(gates[t, e].item()) for t in range(T) for e in range(E)) / T
    assert routing.l1_loss(gates).item() == pytest.approx(expected, rel=1e-12)


def reference_lb_loss(gates: np.ndarray, topk: int) -> float:
    """Eq. 10/11 written out with loops."""
    num_tokens, num_experts = gates.shape
    f = [num_experts / (topk * num_tokens) * sum(gates[t, e] > 0 for t in range(num_tokens))
         for e in range(num_experts)]
    return sum(f[e] * gates[t, e] for t in range(num_tokens) for e in range(num_experts)) / num_tokens


def test_load_balanced_l1_loss_matches_eq_10_11():
    gates = routing.relu_gates(logits_away_from_zero())
    expected = reference_lb_loss(gates.numpy(), K)
    assert routing.load_balanced_l1_loss(gates, K).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss", ["l1", "lb"])
def test_gradcheck_float64(loss):
    logits = logits_away_from_zero().requires_grad_()

    def fn(x):
        gates = routing.relu_gates(x)
        return routing.l1_loss(gates) if loss == "l1" else routing.load_balanced_l1_loss(gates, K)

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8)


def test_load_balanced_gradient_is_f_over_t_on_active_gates_only():
    logits = logits_away_from_zero().requires_grad_()
    routing.load_balanced_l1_loss(routing.relu_gates(logits), K).backward()
    active = (logits.detach() > 0).numpy()
    f = E / (K * T) * active.sum(axis=0)
    expected = np.where(active, f[None, :] / T, 0.0)
    np.testing.assert_allclose(logits.grad.numpy(), expected, rtol=1e-12, atol=0)


def test_f_carries_no_gradient():
    # Counts that could carry a gradient (a soft count, say, or counts reduced by a collective
    # that keeps the graph): Eq. 11's f is still a constant, and the loss's gradient only the
    # f-weighted gates'.
    gates = routing.relu_gates(logits_away_from_zero().requires_grad_())
    soft_counts_E = gates.sum(dim=0)
    assert soft_counts_E.requires_grad
    f = routing.load_balance_weights(soft_counts_E, T, K)
    assert not f.requires_grad
    loss = routing.load_balanced_l1_loss(gates, K, tokens_per_expert_E=soft_counts_E,
                                         num_tokens=T)
    (grad_gates,) = torch.autograd.grad(loss, gates)
    expected = (f / T).expand_as(gates)
    torch.testing.assert_close(grad_gates, expected.to(grad_gates.dtype))


def test_global_counts_make_token_shards_add_up():
    # A rank that routes half of the layer's tokens uses the layer-wide counts; the shards'
    # losses then sum to the whole layer's loss and their sparsities agree with it.
    gates = routing.relu_gates(logits_away_from_zero())
    counts = routing.tokens_per_expert(gates)
    halves = gates[: T // 2], gates[T // 2:]
    shared = dict(tokens_per_expert_E=counts, num_tokens=T)
    lb = sum(routing.load_balanced_l1_loss(h, K, **shared) for h in halves)
    l1 = sum(routing.l1_loss(h, num_tokens=T) for h in halves)
    assert lb.item() == pytest.approx(routing.load_balanced_l1_loss(gates, K).item(), rel=1e-12)
    assert l1.item() == pytest.approx(routing.l1_loss(gates).item(), rel=1e-12)
    assert routing.sparsity(halves[0], **shared).item() == routing.sparsity(gates).item()


def test_bf16_gates_are_summed_in_fp32():
    gates = torch.full((4096, E), 0.01, dtype=torch.bfloat16)
    assert routing.l1_loss(gates).dtype == torch.float32
    assert routing.l1_loss(gates).item() == pytest.approx(E * gates[0, 0].float().item(), rel=1e-6)
