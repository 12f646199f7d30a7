"""The sorted token path (``--moe-token-dispatcher-type sorted``) against megatron-core's alltoall
dispatcher: the same loss, gradients and routing statistics, with one host read per MoE layer."""

from __future__ import annotations

import pytest
import torch

from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.moe.moe_layer import MoELayer

from remoe_patches.config.model_config import ConfigError, ModelConfig, ParallelConfig
from remoe_patches.runtime.host_sync import HostSyncCounter
from remoe_patches.model.build import build_model
from remoe_patches.config.router_registry import ReLUOptions
from remoe_patches.model.token_dispatch import SortedTokenDispatcher

from tiny import TINY_MODEL, batch


def run(dispatcher, router, grouped_gemm, seed=0, l1_coeff_init=0.3):
    torch.manual_seed(1)
    model_parallel_cuda_manual_seed(1)
    config = ModelConfig(
        router=router,
        token_dispatcher=dispatcher,
        moe_grouped_gemm=grouped_gemm,
        num_experts=4,
        topk=2,
        **TINY_MODEL,
        **(
            dict(router_options=ReLUOptions(l1_coeff_init=l1_coeff_init))
            if router == "relu"
            else {}
        ),
    )
    built = build_model(config, ParallelConfig())
    tokens, positions, labels = batch(seed)
    loss = built.model(tokens, positions, None, labels=labels).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in built.model.named_parameters()}
    stats = built.regularizer.finish_step() if built.regularizer is not None else None
    return built, loss.detach(), grads, stats


@pytest.mark.parametrize("router", ["relu", "topk"])
@pytest.mark.parametrize("grouped_gemm", [True, False])
def test_sorted_path_matches_megatrons_alltoall(single_rank, router, grouped_gemm):
    built, loss, grads, stats = run("sorted", router, grouped_gemm)
    moe_layers = [m for m in built.model.modules() if isinstance(m, MoELayer)]
    assert moe_layers and all(
        isinstance(m.token_dispatcher, SortedTokenDispatcher) for m in moe_layers
    )
    _, ref_loss, ref_grads, ref_stats = run("alltoall", router, grouped_gemm)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        if "router" in name or "experts" in name:
            assert grad.abs().max() > 0, name  # the path carries gradient to every part
    if stats is not None:
        for field in ("sparsity", "sparsity_L", "reg_loss_L", "expert_load_LE"):
            torch.testing.assert_close(
                getattr(stats, field), getattr(ref_stats, field), equal_nan=True, msg=field
            )


def test_tokens_without_experts_and_layers_without_pairs(single_rank):
    """ReLU routing may give a token no expert, or a whole layer no pair at all: the token then
    passes through the residual alone, as with megatron's dispatcher."""
    torch.manual_seed(1)
    model_parallel_cuda_manual_seed(1)
    config = ModelConfig(
        router="relu",
        token_dispatcher="sorted",
        moe_grouped_gemm=True,
        num_experts=4,
        topk=1,
        **TINY_MODEL,
    )
    moe = next(
        m for m in build_model(config, ParallelConfig()).model.modules() if isinstance(m, MoELayer)
    )
    x = torch.randn(6, 1, TINY_MODEL["hidden_size"], requires_grad=True)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 1.0  # expert 2 takes the tokens with x0 > 0, nobody else
    out, _ = moe(x)
    routed = x[:, 0, 0] > 0
    assert routed.any() and not routed.all()
    assert torch.equal(out[~routed], torch.zeros_like(out[~routed]))
    # the routed tokens: expert 2 alone, weighted by its gate x0
    x_routed = x[routed, 0].detach()
    expected, _ = moe.experts(x_routed, torch.tensor([0, 0, int(routed.sum()), 0]), x_routed[:, 0])
    torch.testing.assert_close(out[routed, 0], expected)
    with torch.no_grad():
        moe.router.weight.fill_(-1.0)
        x.data = x.data.abs()  # every gate below zero: no pair in the layer
    out, _ = moe(x)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()  # an empty layer still has a backward pass


def test_one_host_read_per_layer(single_rank):
    built, *_ = run("sorted", "relu", True)
    moe = next(m for m in built.model.modules() if isinstance(m, MoELayer))
    x = torch.randn(TINY_MODEL["seq_length"], 2, TINY_MODEL["hidden_size"], requires_grad=True)
    with HostSyncCounter() as syncs:
        out, _ = moe(x)
        out.sum().backward()
    assert syncs.total == 1 and syncs.by_source == {"dispatcher": 1}


@pytest.mark.parametrize(
    "layout",
    [
        dict(expert_model_parallel_size=2),
        dict(tensor_model_parallel_size=2, sequence_parallel=True),
    ],
)
def test_refused_where_tokens_or_experts_are_split(layout):
    model = ModelConfig(
        router="relu", token_dispatcher="sorted", num_experts=4, topk=1, **TINY_MODEL
    )
    with pytest.raises(ConfigError, match="sorted token dispatcher keeps every expert"):
        ParallelConfig(**layout).validate_for(model)


def test_refused_with_token_dropping():
    with pytest.raises(ConfigError, match="ModelConfig.token_dispatcher=sorted: .*dropless"):
        ModelConfig(
            router="topk",
            token_dispatcher="sorted",
            moe_expert_capacity_factor=1.0,
            num_experts=4,
            topk=1,
            **TINY_MODEL,
        ).validate()
