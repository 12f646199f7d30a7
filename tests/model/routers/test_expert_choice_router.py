"""``ExpertChoiceRouter`` in megatron-core: its routing is the loop reference's on the router's
own logits, its gradient reaches the router weight exactly, a tiny GPTModel trains with it,
and it is not causal: a later token changes an earlier token's routing, and the model's output
at earlier positions (the leak the module docstring describes). Unsupported layouts are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron.core.transformer.moe.moe_layer import MoELayer

from remoe_patches.config.model_config import ConfigError
from remoe_patches.model.routers.expert_choice_router import (
    ExpertChoiceRouter,
    expert_choice_router_builder,
)

from routing_references import reference_expert_choice
from tiny import NUM_EXPERTS, TINY_MODEL, batch, build_gpt, fake_groups, transformer_config

HIDDEN = TINY_MODEL["hidden_size"]
SEQ = TINY_MODEL["seq_length"]


def ec_router(config=None, **builder_args):
    return expert_choice_router_builder(**builder_args)(
        config=config or transformer_config(), pg_collection=fake_groups()
    )


def identity_router(**builder_args):
    """A router whose logits are the first E coordinates of the hidden state."""
    router = ec_router(**builder_args)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, :NUM_EXPERTS] = torch.eye(NUM_EXPERTS)
    return router


@pytest.mark.parametrize("group", ["sequence", "batch"])
def test_router_output_is_the_loop_reference_on_its_logits(group):
    router = ec_router(group=group, capacity_factor=1.5)
    x = torch.randn(SEQ, 3, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        router.weight.normal_(0, 1.0)
    gates, routing_map = router(x)
    logits = x @ router.weight.t()
    expected_map, scores = reference_expert_choice(logits, 1, 1.5, group)
    assert np.array_equal(routing_map.numpy(), expected_map)
    np.testing.assert_allclose(
        gates.detach().numpy(), np.where(expected_map, scores, 0.0), rtol=1e-5, atol=1e-7
    )
    # C = round(1.5 * N / 8): 3 of each 16-token sequence, 9 of the 48-token micro-batch
    group_size = SEQ if group == "sequence" else 3 * SEQ
    per_group = routing_map.reshape(SEQ, 3, NUM_EXPERTS)
    per_group = per_group.sum(0) if group == "sequence" else per_group.sum((0, 1))
    assert (per_group == round(1.5 * group_size / NUM_EXPERTS + 1e-9)).all()


@pytest.mark.parametrize("group", ["sequence", "batch"])
def test_gate_gradient_reaches_the_router_weight_exactly(group):
    router = ec_router(group=group)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        router.weight.normal_(0, 1.0, generator=gen)
    x = torch.randn(SEQ, 2, HIDDEN, generator=gen)
    upstream = torch.randn(SEQ * 2, NUM_EXPERTS, generator=gen)
    gates, _ = router(x)
    (grad,) = torch.autograd.grad((gates * upstream).sum(), router.weight)

    logits = x.reshape(-1, HIDDEN) @ router.weight.t()
    scores = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    chosen, _ = reference_expert_choice(x @ router.weight.t(), 1, 1.0, group)
    reference_gates = scores * torch.from_numpy(chosen).float()
    (expected,) = torch.autograd.grad((reference_gates * upstream).sum(), router.weight)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    assert grad.abs().max() > 0


def test_a_later_token_changes_an_earlier_tokens_routing():
    """group="sequence": raising a later token's score for expert e displaces the weakest
    token e had chosen, an earlier one; a change in another sequence changes nothing here.
    group="batch": the displaced token may sit in another sequence."""
    x = torch.randn(SEQ, 2, HIDDEN, generator=torch.Generator().manual_seed(4))
    scores_SBE = torch.softmax(x[..., :NUM_EXPERTS], dim=-1)  # what each expert ranks by
    last = SEQ - 1

    router = identity_router(group="sequence")
    _, before = router(x)
    before_SBE = before.reshape(SEQ, 2, NUM_EXPERTS)
    expert = next(e for e in range(NUM_EXPERTS) if not before_SBE[last, 0, e])
    chosen = before_SBE[:, 0, expert].nonzero()[:, 0]
    weakest = chosen[scores_SBE[chosen, 0, expert].argmin()].item()
    changed = x.clone()
    changed[last, 0, expert] = 100.0  # only the LAST token of sequence 0 changes
    _, after = router(changed)
    after_SBE = after.reshape(SEQ, 2, NUM_EXPERTS)
    assert weakest < last
    assert before_SBE[weakest, 0, expert] and not after_SBE[weakest, 0, expert]
    assert torch.equal(after_SBE[:, 1], before_SBE[:, 1])  # sequence 1 untouched

    router = identity_router(group="batch")
    _, before = router(x)
    before_SBE = before.reshape(SEQ, 2, NUM_EXPERTS)
    for expert in range(NUM_EXPERTS):
        chosen = before_SBE[..., expert].nonzero()
        weakest_s, weakest_b = chosen[
            scores_SBE[chosen[:, 0], chosen[:, 1], expert].argmin()
        ].tolist()
        if weakest_b == 0 and not before_SBE[last, 1, expert]:
            break
    else:
        pytest.fail("no expert whose weakest choice is in sequence 0")
    changed = x.clone()
    changed[last, 1, expert] = 100.0  # a token of sequence 1 ...
    _, after = router(changed)
    assert not after.reshape(SEQ, 2, NUM_EXPERTS)[weakest_s, 0, expert]  # ... evicts one of 0


def earlier_outputs_change(model, tokens, position):
    """Whether replacing the token at ``position`` changes the logits at earlier positions."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        reference = model(tokens, positions, None)[:, :position]
        for replacement in range(4):
            changed = tokens.clone()
            changed[:, position] = (tokens[:, position] + 1 + replacement) % TINY_MODEL[
                "vocab_size"
            ]
            output = model(changed, positions, None)[:, :position]
            if not torch.equal(output, reference):
                return True
    return False


def test_the_model_sees_the_future_through_expert_choice(single_rank):
    """The leak in a whole model: a later input token changes the outputs at earlier
    positions, which causal attention alone (the TopK control) never does."""
    tokens = batch(0, batch_size=1)[0]
    expert_choice = build_gpt(expert_choice_router_builder()).eval()
    assert earlier_outputs_change(expert_choice, tokens, SEQ - 2)
    assert not earlier_outputs_change(build_gpt(None).eval(), tokens, SEQ - 2)


def test_a_tiny_gpt_model_trains_one_step(single_rank):
    model = build_gpt(expert_choice_router_builder())
    routers = [m for m in model.modules() if isinstance(m, ExpertChoiceRouter)]
    assert len(routers) == 2
    maps = {}
    for router in routers:
        router.register_forward_hook(lambda m, args, out: maps.__setitem__(m, out[1]))
    tokens, positions, labels = batch(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = model(tokens, positions, None, labels=labels).mean()
    loss.backward()
    assert torch.isfinite(loss)
    for router in routers:
        # round(16 / 8) = 2 tokens of each of the 3 sequences per expert
        assert (maps[router].reshape(SEQ, 3, NUM_EXPERTS).sum(0) == 2).all()
        assert router.weight.grad.abs().max() > 0
    for layer in [m for m in model.modules() if isinstance(m, MoELayer)]:
        for expert in layer.experts.local_experts:
            assert all(p.grad.abs().max() > 0 for p in expert.parameters())
    optimizer.step()
    with torch.no_grad():
        next_loss = model(tokens, positions, None, labels=labels).mean()
    assert torch.isfinite(next_loss) and next_loss < loss


def test_sequence_and_context_parallelism_are_refused():
    config = transformer_config()
    config.sequence_parallel, config.tensor_model_parallel_size = True, 2
    with pytest.raises(ConfigError, match="sequence parallelism at TP=2.*use TP=1"):
        ec_router(config)
    config = transformer_config()
    config.context_parallel_size = 2
    with pytest.raises(ConfigError, match=r"context parallelism \(CP=2\).*use CP=1"):
        ec_router(config)


def test_padding_masks_are_refused():
    with pytest.raises(NotImplementedError, match="padding"):
        ec_router()(torch.zeros(SEQ, 1, HIDDEN), torch.ones(SEQ, 1, dtype=torch.bool))


@pytest.mark.parametrize(
    "args, field",
    [
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=float("nan")), "capacity_factor"),
        (dict(capacity_factor="1"), "capacity_factor"),
        (dict(group="token"), "group"),
    ],
)
def test_builder_validates_its_arguments(args, field):
    with pytest.raises(ConfigError, match=f"expert_choice_router_builder: {field}"):
        expert_choice_router_builder(**args)
