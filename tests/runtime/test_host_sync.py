"""The ReLU router, the regularizer and the coefficient update never make the host wait."""

from __future__ import annotations

import pytest
import torch

from megatron.core.transformer.moe.moe_layer import MoELayer

from remoe_patches.config.model_config import ModelConfig
from remoe_patches.runtime.host_sync import HostSyncCounter
from remoe_patches.model.build import build_model
from remoe_patches.model.routers.relu_router import ReLURouter
from remoe_patches.config.router_registry import ReLUOptions

from tiny import TINY_MODEL


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.item(),
        lambda t: t.tolist(),
        lambda t: t.cpu(),
        lambda t: bool(t.sum() > 0),
        lambda t: t.nonzero(),
        lambda t: torch.nonzero(t),
    ],
)
def test_counter_catches_each_syncing_call(call):
    tensor = torch.ones(3)
    with pytest.raises(RuntimeError, match="host synchronisation"):
        with HostSyncCounter(raise_on_sync=True):
            call(tensor)


def test_counter_counts_without_raising():
    with HostSyncCounter() as syncs:
        torch.ones(2).sum().item()
        torch.ones(2).tolist()
    assert syncs.counts == {"item": 1, "tolist": 1}


@pytest.mark.parametrize("load_balancing", [True, False])
def test_moe_layer_step_has_no_sync_in_router_or_update(single_rank, load_balancing):
    cfg = ModelConfig(
        router="relu", router_options=ReLUOptions(load_balancing=load_balancing), **TINY_MODEL
    )
    built = build_model(cfg, single_rank)
    moe = next(m for m in built.model.modules() if isinstance(m, MoELayer))
    router = moe.router
    assert isinstance(router, ReLURouter)

    # The dispatcher needs host-side token counts (megatron's own, by design); the router does
    # not: fail on any sync made while the router runs, forward and backward.
    def strict_forward(module, args, kwargs, original=router.forward):
        with HostSyncCounter(raise_on_sync=True):
            return original(*args, **kwargs)

    router.forward = lambda *args, **kwargs: strict_forward(router, args, kwargs)
    x = torch.randn(TINY_MODEL["seq_length"], 2, TINY_MODEL["hidden_size"], requires_grad=True)
    out, _ = moe(x)
    with HostSyncCounter(raise_on_sync=True):
        probs, routing_map = router(x.detach().requires_grad_())
        (probs.sum() * 2).backward()
        built.regularizer.finish_step()
    out.sum().backward()
    assert router.weight.grad is not None
