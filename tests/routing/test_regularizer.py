"""The regularizer: its L1 losses (spec Eq. 9-11) against independent computations, and
AdaptiveL1 (Eq. 7/8): scripted updates, the tie rule, the step's statistics, state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from remoe_patches.routing import relu_gates
from remoe_patches.routing.regularizer import (
    AdaptiveL1,
    l1_loss,
    load_balance_weights,
    load_balanced_l1_loss,
    reg_loss_gradient,
)
from routing_references import E, K, T, logits_away_from_zero


def test_scripted_sparsity_sequence_with_tie():
    reg = AdaptiveL1(target_sparsity=0.875, num_layers=1, l1_coeff_init=1e-8, multiplier=1.2)
    sparsities = [0.5, 0.6, 0.9, 0.875, 0.874, 1.0]
    # too dense -> *alpha; too sparse or exactly at target -> /alpha
    exponents = [+1, +1, -1, -1, +1, -1]
    expected = 1e-8
    for sparsity, exponent in zip(sparsities, exponents):
        reg.update(torch.tensor(sparsity))
        expected *= 1.2**exponent
        assert reg.l1_coeff.item() == pytest.approx(expected, rel=1e-6)
    assert reg.l1_coeff.dtype == torch.float32 and reg.l1_coeff.dim() == 0


def test_step_statistics_average_micro_batches_then_moe_layers():
    reg = AdaptiveL1(target_sparsity=0.5, num_layers=4, num_experts=2)
    # layers 1 and 3 are MoE (two micro-batches of 4 tokens each); 2 and 4 are dense, no records
    # micro-batch sparsities (Eq. 8, 1 - pairs / (4 x 2)): layer 1: 0.5, 0.0; layer 3: 0.5, 1.0
    for counts_1, loss_1, counts_3, loss_3 in [
        ([2.0, 2.0], 1.0, [3.0, 1.0], 0.5),
        ([4.0, 4.0], 3.0, [0.0, 0.0], 0.5),
    ]:
        reg.record(
            1,
            reg_loss=torch.tensor(loss_1),
            tokens_per_expert_E=torch.tensor(counts_1),
            num_tokens=4,
        )
        reg.record(
            3,
            reg_loss=torch.tensor(loss_3),
            tokens_per_expert_E=torch.tensor(counts_3),
            num_tokens=4,
        )
    stats = reg.finish_step(update=False)
    assert stats.sparsity_L[0].item() == pytest.approx(0.25)
    assert stats.sparsity_L[2].item() == pytest.approx(0.75)
    assert math.isnan(stats.sparsity_L[1].item()) and math.isnan(stats.sparsity_L[3].item())
    assert stats.sparsity.item() == pytest.approx((0.25 + 0.75) / 2)
    assert stats.reg_loss_L[0].item() == pytest.approx(2.0)
    assert stats.reg_loss_L[2].item() == pytest.approx(0.5)
    assert math.isnan(stats.reg_loss_L[1].item())
    # 3 of 8 tokens went to expert 0 of layer 3, 1 of 8 to expert 1
    assert stats.expert_load_LE[2].tolist() == pytest.approx([3 / 8, 1 / 8])
    assert stats.expert_load_LE[0].tolist() == pytest.approx([6 / 8, 6 / 8])
    assert torch.isnan(stats.expert_load_LE[1]).all()
    # the records are consumed: the next step starts empty
    reg.record(1, reg_loss=torch.tensor(0.0), tokens_per_expert_E=torch.zeros(2), num_tokens=4)
    assert reg.finish_step().sparsity.item() == pytest.approx(1.0)


def test_replicated_records_count_once_and_loss_shares_add_up():
    """Two ranks splitting a layer's tokens (TP/SP/CP) record the same counts and half of the
    loss each; summed over both (what finish_step's reduction does) the step's statistics are
    those of one rank recording the whole layer."""
    whole = AdaptiveL1(target_sparsity=0.5, num_layers=1, num_experts=2)
    whole.record(
        1, reg_loss=torch.tensor(3.0), tokens_per_expert_E=torch.tensor([6.0, 2.0]), num_tokens=8
    )
    shards = [AdaptiveL1(target_sparsity=0.5, num_layers=1, num_experts=2) for _ in range(2)]
    for shard, share in zip(shards, (1.0, 2.0)):
        shard.record(
            1,
            reg_loss=torch.tensor(share),
            tokens_per_expert_E=torch.tensor([6.0, 2.0]),
            num_tokens=8,
            replicas=2,
        )
    summed = shards[0]
    summed._stats_LC += shards[1]._stats_LC  # the all-reduce over the two ranks
    expected, got = whole.finish_step(), summed.finish_step()
    for field in ("sparsity", "sparsity_L", "reg_loss_L", "expert_load_LE", "l1_coeff"):
        torch.testing.assert_close(getattr(got, field), getattr(expected, field))
    assert expected.sparsity.item() == pytest.approx(0.5)
    assert summed.l1_coeff.item() == whole.l1_coeff.item()


def test_finish_step_updates_from_the_reduced_value():
    reg = AdaptiveL1(
        target_sparsity=0.875, num_layers=2, num_experts=8, l1_coeff_init=1.0, multiplier=2.0
    )

    def record(layer, active_pairs):  # of 10 tokens x 8 experts
        reg.record(
            layer,
            reg_loss=torch.tensor(0.0),
            num_tokens=10,
            tokens_per_expert_E=torch.tensor([active_pairs] + [0.0] * 7),
        )

    record(1, 8.0)  # sparsity 0.9
    record(2, 16.0)  # sparsity 0.8: mean 0.85 < 0.875, too dense
    stats = reg.finish_step()
    assert stats.sparsity.item() == pytest.approx(0.85)
    assert reg.l1_coeff.item() == 2.0
    assert stats.l1_coeff.item() == 1.0  # the coefficient the step trained with
    # a skipped step's statistics are consumed without an update
    record(1, 72.0)
    reg.finish_step(update=False)
    assert reg.l1_coeff.item() == 2.0


def test_state_round_trip():
    reg = AdaptiveL1(target_sparsity=0.75, num_layers=2, l1_coeff_init=3e-4, multiplier=1.3)
    reg.update(torch.tensor(0.1))
    restored = AdaptiveL1(target_sparsity=0.5, num_layers=2, l1_coeff_init=1.0, multiplier=1.1)
    restored.load_state_dict(reg.state_dict())
    assert restored.l1_coeff.item() == reg.l1_coeff.item()
    assert (restored.multiplier, restored.target_sparsity) == (1.3, 0.75)
    # the saved state is a copy, not a view of the live coefficient
    state = reg.state_dict()
    reg.update(torch.tensor(0.1))
    assert state["l1_coeff"].item() != reg.l1_coeff.item()


def test_state_saved_before_the_rename_loads():
    # checkpoints written before the coefficient was named l1_coeff hold it as "coeff"
    old_state = {"coeff": torch.tensor(2.5e-6), "multiplier": 1.3, "target_sparsity": 0.75}
    restored = AdaptiveL1(target_sparsity=0.5, num_layers=2, l1_coeff_init=1.0, multiplier=1.1)
    restored.load_state_dict(old_state)
    assert restored.l1_coeff.item() == pytest.approx(2.5e-6)
    assert restored.l1_coeff.dtype == torch.float32
    assert (restored.multiplier, restored.target_sparsity) == (1.3, 0.75)
    assert set(restored.state_dict()) == {"l1_coeff", "multiplier", "target_sparsity"}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(target_sparsity=1.0), "target_sparsity"),
        (dict(target_sparsity=0.5, multiplier=1.0), "multiplier"),
        (dict(target_sparsity=0.5, l1_coeff_init=0.0), "l1_coeff_init"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"AdaptiveL1.{field}"):
        AdaptiveL1(num_layers=1, **kwargs)


# The losses (one layer)


def test_l1_loss_is_mean_token_l1_norm():
    gates = relu_gates.relu_gates(logits_away_from_zero())
    expected = sum(abs(gates[t, e].item()) for t in range(T) for e in range(E)) / T
    assert l1_loss(gates).item() == pytest.approx(expected, rel=1e-12)


def reference_lb_loss(gates: np.ndarray, topk: int) -> float:
    """Eq. 10/11 written out with loops."""
    num_tokens, num_experts = gates.shape
    f = [
        num_experts / (topk * num_tokens) * sum(gates[t, e] > 0 for t in range(num_tokens))
        for e in range(num_experts)
    ]
    return (
        sum(f[e] * gates[t, e] for t in range(num_tokens) for e in range(num_experts)) / num_tokens
    )


def test_load_balanced_l1_loss_matches_eq_10_11():
    gates = relu_gates.relu_gates(logits_away_from_zero())
    expected = reference_lb_loss(gates.numpy(), K)
    assert load_balanced_l1_loss(gates, K).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss", ["l1", "lb"])
def test_gradcheck_float64(loss):
    logits = logits_away_from_zero().requires_grad_()

    def fn(x):
        gates = relu_gates.relu_gates(x)
        return l1_loss(gates) if loss == "l1" else load_balanced_l1_loss(gates, K)

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8)


def test_load_balanced_gradient_is_f_over_t_on_active_gates_only():
    logits = logits_away_from_zero().requires_grad_()
    load_balanced_l1_loss(relu_gates.relu_gates(logits), K).backward()
    active = (logits.detach() > 0).numpy()
    f = E / (K * T) * active.sum(axis=0)
    expected = np.where(active, f[None, :] / T, 0.0)
    np.testing.assert_allclose(logits.grad.numpy(), expected, rtol=1e-12, atol=0)


def test_f_carries_no_gradient():
    # Counts that could carry a gradient (a soft count, say, or counts reduced by a collective
    # that keeps the graph): Eq. 11's f is still a constant, and the loss's gradient only the
    # f-weighted gates'.
    gates = relu_gates.relu_gates(logits_away_from_zero().requires_grad_())
    soft_counts_E = gates.sum(dim=0)
    assert soft_counts_E.requires_grad
    f = load_balance_weights(soft_counts_E, T, K)
    assert not f.requires_grad
    loss = load_balanced_l1_loss(gates, K, tokens_per_expert_E=soft_counts_E, num_tokens=T)
    (grad_gates,) = torch.autograd.grad(loss, gates)
    expected = (f / T).expand_as(gates)
    torch.testing.assert_close(grad_gates, expected.to(grad_gates.dtype))


def test_global_counts_make_token_shards_add_up():
    # A rank that routes half of the layer's tokens uses the layer-wide counts; the shards'
    # losses then sum to the whole layer's loss and their sparsities agree with it.
    gates = relu_gates.relu_gates(logits_away_from_zero())
    counts = relu_gates.tokens_per_expert(gates)
    halves = gates[: T // 2], gates[T // 2 :]
    shared = dict(tokens_per_expert_E=counts, num_tokens=T)
    lb = sum(load_balanced_l1_loss(h, K, **shared) for h in halves)
    l1 = sum(l1_loss(h, num_tokens=T) for h in halves)
    assert lb.item() == pytest.approx(load_balanced_l1_loss(gates, K).item(), rel=1e-12)
    assert l1.item() == pytest.approx(l1_loss(gates).item(), rel=1e-12)
    assert relu_gates.sparsity(halves[0], **shared).item() == relu_gates.sparsity(gates).item()


def test_bf16_gates_are_summed_in_fp32():
    gates = torch.full((4096, E), 0.01, dtype=torch.bfloat16)
    assert l1_loss(gates).dtype == torch.float32
    assert l1_loss(gates).item() == pytest.approx(E * gates[0, 0].float().item(), rel=1e-6)


@pytest.mark.parametrize("load_balancing", [True, False])
def test_reg_loss_gradient_is_the_losses_gradient(load_balancing):
    """The per-expert gradient the router applies is autograd's gradient of Eq. 10 / Eq. 9 with
    respect to every gate, and the losses are linear in the gates with it."""
    gates = relu_gates.relu_gates(logits_away_from_zero()).requires_grad_()
    counts = relu_gates.tokens_per_expert(gates)
    loss = load_balanced_l1_loss(gates, K) if load_balancing else l1_loss(gates)
    (expected_TE,) = torch.autograd.grad(loss, gates)
    grad_E = reg_loss_gradient(counts, T, K, load_balancing)
    torch.testing.assert_close(grad_E.expand(T, E).to(expected_TE.dtype), expected_TE)
    assert (gates.detach() * grad_E).sum().item() == pytest.approx(loss.item(), rel=1e-12)
