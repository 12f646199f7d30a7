"""Expert Choice routing math (``routing.expert_choice_routing``) against independent loop and
numpy computations: the capacity, the choices, the gates and their gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from remoe_patches.routing.expert_choice_routing import (
    expert_choice_capacity,
    expert_choice_routing,
)

from routing_references import reference_expert_choice


# --- Expert Choice routing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, experts, topk, factor, expected",
    [
        (16, 8, 1, 1.0, 2),  # T k / E
        (10, 4, 1, 1.0, 3),  # 2.5 rounds up
        (12, 8, 1, 1.0, 2),  # 1.5 rounds up
        (11, 8, 1, 1.0, 1),  # 1.375
        (3, 8, 1, 1.0, 1),  # at least one token
        (4, 2, 1, 4.0, 4),  # at most the group
        (16, 4, 2, 1.0, 8),  # k = 2
        (16, 4, 1, 2.0, 8),  # capacity factor 2
    ],
)
def test_capacity(tokens, experts, topk, factor, expected):
    assert expert_choice_capacity(tokens, experts, topk, factor) == expected


def random_logits(seq_length=12, batch_size=3, num_experts=4, seed=0):
    return (
        torch.randn(
            seq_length, batch_size, num_experts, generator=torch.Generator().manual_seed(seed)
        )
        * 2
    )


@pytest.mark.parametrize("group", ["sequence", "batch"])
@pytest.mark.parametrize("topk, factor", [(1, 1.0), (2, 1.0), (1, 1.5), (1, 0.3)])
def test_expert_choice_against_loops(group, topk, factor):
    logits = random_logits()
    gates, routing_map = expert_choice_routing(
        logits, topk=topk, capacity_factor=factor, group=group
    )
    expected_map, scores = reference_expert_choice(logits, topk, factor, group)
    assert np.array_equal(routing_map.numpy(), expected_map)
    assert gates.dtype == torch.float32
    np.testing.assert_allclose(
        gates.numpy(), np.where(expected_map, scores, 0.0), rtol=1e-5, atol=1e-7
    )


def test_every_expert_gets_exactly_capacity_tokens_per_group():
    seq_length, batch_size, num_experts = 10, 3, 4
    logits = random_logits(seq_length, batch_size, num_experts, seed=1)
    _, per_sequence = expert_choice_routing(logits, topk=1, group="sequence")
    per_sequence_SBE = per_sequence.reshape(seq_length, batch_size, num_experts)
    # round(10 / 4) = 3 of each sequence's 10 tokens, per expert
    assert (per_sequence_SBE.sum(0) == 3).all()
    _, per_batch = expert_choice_routing(logits, topk=1, group="batch")
    # round(30 / 4) = 8 of the micro-batch's 30 tokens, per expert
    assert (per_batch.sum(0) == 8).all()


def test_a_token_may_get_no_expert_or_several():
    """E=4, one sequence of 8 tokens, C=2. Tokens 0 and 1 lead experts 0 and 1; tokens 2-5
    lead experts 2 and 3; tokens 6 and 7 are beaten everywhere."""
    logits = torch.tensor(
        [
            [3, 3, 0, 0],
            [4, 4, 0, 0],
            [0, 0, 5, 0],
            [0, 0, 4, 0],
            [0, 0, 0, 5],
            [0, 0, 0, 4],
            [0, 0, 1, 1],
            [0, 0, 2, 2],
        ],
        dtype=torch.float32,
    )[:, None, :]
    _, routing_map = expert_choice_routing(logits, topk=1)
    assert routing_map.sum(1).tolist() == [2, 2, 1, 1, 1, 1, 0, 0]
    assert routing_map[0].tolist() == [True, True, False, False]
    # with room for every token, every expert takes every token: E experts each
    _, everything = expert_choice_routing(logits, topk=1, capacity_factor=4.0)
    assert everything.all()


def test_batch_and_sequence_grouping_differ_as_expected():
    """Sequence 0's tokens all prefer expert 0 more than sequence 1's: with group="batch"
    expert 0 takes only sequence 0's tokens, with group="sequence" it takes C of each."""
    seq_length, num_experts = 8, 2
    logits = torch.zeros(seq_length, 2, num_experts)
    logits[:, 0, 0] = 3 + torch.arange(seq_length) * 0.1
    logits[:, 1, 0] = -3 + torch.arange(seq_length) * 0.1
    _, per_batch = expert_choice_routing(logits, topk=1, group="batch")
    per_batch_SBE = per_batch.reshape(seq_length, 2, num_experts)
    assert per_batch_SBE[:, 0, 0].sum() == 8 and per_batch_SBE[:, 1, 0].sum() == 0
    assert per_batch_SBE[:, 1, 1].sum() == 8 and per_batch_SBE[:, 0, 1].sum() == 0
    _, per_sequence = expert_choice_routing(logits, topk=1, group="sequence")
    per_sequence_SBE = per_sequence.reshape(seq_length, 2, num_experts)
    assert (per_sequence_SBE.sum(0) == 4).all()
    # each sequence's expert 0 takes its 4 latest tokens (their logits grow with s)
    assert per_sequence_SBE[:, :, 0].nonzero()[:, 0].tolist() == [4, 4, 5, 5, 6, 6, 7, 7]


@pytest.mark.parametrize("group", ["sequence", "batch"])
def test_gate_gradient_matches_plain_ops(group):
    seq_length, batch_size, hidden, num_experts = 6, 2, 5, 3
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(seq_length, batch_size, hidden, generator=gen, dtype=torch.float64)
    weight = torch.randn(
        num_experts, hidden, generator=gen, dtype=torch.float64, requires_grad=True
    )
    upstream = torch.randn(seq_length * batch_size, num_experts, generator=gen, dtype=torch.float64)

    gates, _ = expert_choice_routing(x @ weight.t(), topk=1, group=group)
    (grad,) = torch.autograd.grad((gates * upstream).sum(), weight)

    logits = x.reshape(-1, hidden) @ weight.t()
    scores = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    chosen, _ = reference_expert_choice((x @ weight.t()), 1, 1.0, group)
    reference_gates = scores * torch.from_numpy(chosen).double()
    (expected,) = torch.autograd.grad((reference_gates * upstream).sum(), weight)
    torch.testing.assert_close(grad, expected)
    assert grad.abs().max() > 0


def test_bad_group_is_refused():
    with pytest.raises(ValueError, match="group must be one of"):
        expert_choice_routing(random_logits(), topk=1, group="token")
