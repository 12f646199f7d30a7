"""ReMoE's router, ``ReLURouter``, inside megatron-core's MoE layer on one CPU rank.

The regularizer reaches the router weights with exactly the gradient of
``l1_coeff * mean_l L_reg,l`` (Eq. 10, recomputed here from the router inputs) and leaves the LM
loss unchanged; the router records each step's sparsity (Eq. 8) and expert load from the
routing maps it returns; tokens without experts pass through the residual and empty experts work.
"""

from __future__ import annotations

import pytest
import torch

from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from remoe_patches.config.model_config import ModelConfig
from remoe_patches.model.build import build_model
from remoe_patches.model.routers.relu_router import ReLURouter

from tiny import TINY_MODEL, batch


def lm_loss(model, seed=0):
    tokens, positions, labels = batch(seed)
    return model(tokens, positions, None, labels=labels).mean()


def reference_reg_loss(router_inputs, router_weights, topk):
    """Eq. 10 per layer from the captured router inputs, averaged over layers (independent)."""
    per_layer = []
    for x, weight in zip(router_inputs, router_weights):
        gates = torch.relu(x.reshape(-1, x.shape[-1]) @ weight.t())
        num_tokens, num_experts = gates.shape
        f = (gates > 0).float().sum(0).detach() * num_experts / (topk * num_tokens)
        per_layer.append((gates * f).sum() / num_tokens)
    return torch.stack(per_layer).mean(), torch.stack(per_layer).detach()


def test_regularizer_gradient_and_unchanged_lm_loss(single_rank):
    built = build_model(ModelConfig(router="relu", topk=2, **TINY_MODEL), single_rank)
    model, regularizer = built.model, built.regularizer
    routers = [m for m in model.modules() if isinstance(m, ReLURouter)]
    params = [p for p in model.parameters()]
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))

    def run(l1_coeff):
        regularizer.l1_coeff.fill_(l1_coeff)
        inputs = []
        hooks = [
            r.register_forward_hook(lambda m, args, out: inputs.append(args[0])) for r in routers
        ]
        loss = lm_loss(model)
        for hook in hooks:
            hook.remove()
        return loss, inputs

    loss_without, inputs = run(0.0)
    grads_without = torch.autograd.grad(loss_without, params, retain_graph=True)
    expected_reg, expected_per_layer = reference_reg_loss(
        inputs, [r.weight for r in routers], topk=2
    )
    l1_coeff = 0.7
    expected_extra = torch.autograd.grad(l1_coeff * expected_reg, params, allow_unused=True)
    regularizer.finish_step(update=False)  # drop the records of the run above

    loss_with, _ = run(l1_coeff)
    grads_with = torch.autograd.grad(loss_with, params)
    assert loss_with.item() == loss_without.item()
    torch.testing.assert_close(regularizer.finish_step(update=False).reg_loss_L, expected_per_layer)
    for param, g0, g1, extra in zip(params, grads_without, grads_with, expected_extra):
        extra = torch.zeros_like(g0) if extra is None else extra
        torch.testing.assert_close(g1 - g0, extra, rtol=1e-4, atol=1e-7)
    router_extra = [
        e for p, e in zip(params, expected_extra) if any(p is r.weight for r in routers)
    ]
    assert all(e is not None and e.abs().max() > 0 for e in router_extra)


def test_router_records_the_steps_routing_statistics(single_rank):
    """Sparsity (Eq. 8) and expert load per layer, averaged over micro-batches, against the
    routing maps the routers returned; their mean is what the coefficient update reads."""
    built = build_model(ModelConfig(router="relu", **TINY_MODEL), single_rank)
    routers = [m for m in built.model.modules() if isinstance(m, ReLURouter)]
    maps = {router: [] for router in routers}
    for router in routers:
        router.register_forward_hook(lambda m, args, out: maps[m].append(out[1].detach()))
    for seed in range(3):
        lm_loss(built.model, seed).backward()
    stats = built.regularizer.finish_step(update=False)
    for router in routers:
        layer = router.layer_number - 1
        expected_sparsity = sum(1 - m.float().mean() for m in maps[router]) / len(maps[router])
        assert stats.sparsity_L[layer].item() == pytest.approx(expected_sparsity.item(), rel=1e-6)
        counts_E = sum(m.float().sum(0) for m in maps[router])
        tokens = sum(m.shape[0] for m in maps[router])
        torch.testing.assert_close(stats.expert_load_LE[layer], counts_E / tokens)
    assert stats.sparsity.item() == pytest.approx(stats.sparsity_L.nanmean().item(), rel=1e-6)
    # evaluation forwards record nothing
    built.model.eval()
    with torch.no_grad():
        lm_loss(built.model)
    empty = built.regularizer.finish_step(update=False)
    assert torch.isnan(empty.sparsity_L).all() and torch.isnan(empty.expert_load_LE).all()


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_tokens_without_experts_and_experts_without_tokens(single_rank, dispatcher):
    built = build_model(
        ModelConfig(router="relu", token_dispatcher=dispatcher, **TINY_MODEL), single_rank
    )
    moe = next(m for m in built.model.modules() if isinstance(m, MoELayer))
    assert isinstance(moe.experts, SequentialMLP)
    hidden = TINY_MODEL["hidden_size"]
    num_tokens = 12
    sign = torch.tensor([1.0, -1.0] * (num_tokens // 2))
    x = torch.randn(num_tokens, 1, hidden) * 0.1
    x[:, 0, 0] = sign
    x[:, 0, 1] = 1.0
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 1.0  # expert 0: only tokens with x0 = +1
        moe.router.weight[1:, 1] = -1.0  # experts 1..E-1: never any token
    out, _ = moe(x)
    inactive = sign < 0
    assert torch.equal(out[inactive], torch.zeros_like(out[inactive]))  # residual only
    gate = x[~inactive, 0, 0].unsqueeze(-1)
    expected, _ = moe.experts.local_experts[0](x[~inactive, 0])
    torch.testing.assert_close(out[~inactive, 0], gate * expected)
    out.sum().backward()
    assert moe.router.weight.grad[0, 0] != 0
