"""megatron-core GPTModels built by remoe_patches.model.build, on one CPU rank.

Dense, TopK MoE and ReMoE models run forward and backward, with the paper's sizes and recipe,
fine-grained experts, MoE-layer recomputation and megatron's TopK router options (ReMoE's own
router: ``tests/model/routers/test_relu_router.py``).
"""

from __future__ import annotations

import pytest
import torch

from megatron.core.transformer.moe.router import TopKRouter

from remoe_patches.config.model_config import ModelConfig
from remoe_patches.model.build import build_model
from remoe_patches.model.routers.relu_router import ReLURouter
from remoe_patches.config.router_registry import ReLUOptions

from tiny import TINY_MODEL, batch


def lm_loss(model, seed=0):
    tokens, positions, labels = batch(seed)
    return model(tokens, positions, None, labels=labels).mean()


@pytest.mark.parametrize(
    "router, router_type", [("relu", ReLURouter), ("topk", TopKRouter), ("dense", None)]
)
def test_forward_backward_every_router(single_rank, router, router_type):
    built = build_model(ModelConfig(router=router, **TINY_MODEL), single_rank)
    routers = [m for m in built.model.modules() if isinstance(m, (ReLURouter, TopKRouter))]
    assert [type(r) for r in routers] == ([router_type] * 2 if router_type else [])
    loss = lm_loss(built.model)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in built.model.parameters())


def test_parameter_count_matches_the_built_model(single_rank):
    for router, granularity in [("dense", 1), ("topk", 1), ("relu", 1), ("relu", 2)]:
        cfg = ModelConfig(router=router, granularity=granularity, **TINY_MODEL)
        built = build_model(cfg, single_rank)
        assert sum(p.numel() for p in built.model.parameters()) == cfg.num_parameters()


# spec §3: layers, width, heads, and the dense / MoE (E=8) parameter counts
@pytest.mark.parametrize(
    "preset, shape, dense, moe",
    [
        ("182m", (12, 768, 12), 182e6, 777e6),
        ("469m", (24, 1024, 16), 469e6, 2.58e9),
        ("978m", (24, 1536, 16), 978e6, 5.73e9),
    ],
)
def test_presets_have_the_papers_sizes(preset, shape, dense, moe):
    assert ModelConfig.preset(preset, router="dense").num_parameters() == pytest.approx(
        dense, rel=0.005
    )
    assert ModelConfig.preset(preset, router="relu").num_parameters() == pytest.approx(
        moe, rel=0.005
    )
    built = ModelConfig.preset(preset)
    assert (built.num_layers, built.hidden_size, built.num_attention_heads) == shape
    assert built.num_query_groups == 4 and built.dense_ffn_hidden_size == 4 * shape[1]


def test_llama_recipe(single_rank):
    built = build_model(ModelConfig(router="relu", **TINY_MODEL), single_rank)
    config, model = built.transformer_config, built.model
    assert config.normalization == "RMSNorm" and config.gated_linear_unit
    assert not config.add_bias_linear and config.init_method_std == 0.01
    assert not model.share_embeddings_and_output_weights
    assert model.rotary_pos_emb.inv_freq[1].item() == pytest.approx(1e6 ** (-2 / 8))
    assert config.num_query_groups == 2 and config.hidden_dropout == 0.0


def test_fine_grained_experts(single_rank):
    cfg = ModelConfig(router="relu", num_experts=4, topk=1, granularity=4, **TINY_MODEL)
    built = build_model(cfg, single_rank)
    config = built.transformer_config
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (
        16,
        4,
        16,
    )
    assert built.regularizer.target_sparsity == pytest.approx(1 - 1 / 4)
    lm_loss(built.model).backward()


def test_moe_layer_recomputation_changes_nothing_but_memory(single_rank):
    """Recomputing the MoE layers in backward (the bound on stage I's activation memory) gives
    the same loss, gradients, reg loss and recorded sparsity as keeping their activations."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    runs = []
    for recompute in ({}, dict(recompute_granularity="selective", recompute_modules=["moe"])):
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        built = build_model(
            ModelConfig(router="relu", router_options=ReLUOptions(l1_coeff_init=0.5), **TINY_MODEL),
            single_rank,
            **recompute,
        )
        loss = lm_loss(built.model, seed=1)
        loss.backward()
        stats = built.regularizer.finish_step(update=False)
        runs.append(
            dict(
                loss=loss.detach(),
                reg_loss=stats.reg_loss_L,
                sparsity=stats.sparsity_L,
                grads={name: p.grad.clone() for name, p in built.model.named_parameters()},
            )
        )
    plain, recomputed = runs
    assert plain["reg_loss"].nansum() > 0
    for key in ("loss", "reg_loss", "sparsity"):
        torch.testing.assert_close(recomputed[key], plain[key], rtol=0, atol=0)
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(recomputed["grads"][name], grad, rtol=1e-6, atol=1e-9)


def routed_gates(model, tokens, positions):
    """Each MoE layer's (router input, gates) from one forward pass."""
    seen = []

    def keep(router, args, output):
        seen.append((args[0], output[0]))

    hooks = [
        router.register_forward_hook(keep)
        for router in model.modules()
        if isinstance(router, TopKRouter)
    ]
    with torch.no_grad():
        model(tokens, positions, None)
    for hook in hooks:
        hook.remove()
    return seen


def test_scaled_topk_gates_are_the_scaled_softmax_probabilities(single_rank):
    built = build_model(
        ModelConfig(router="topk", **TINY_MODEL), single_rank, moe_router_topk_scaling_factor=8.0
    )
    tokens, positions, _ = batch()
    routers = [m for m in built.model.modules() if isinstance(m, TopKRouter)]
    for router, (x, gates_TE) in zip(routers, routed_gates(built.model, tokens, positions)):
        # independently: softmax over all experts, the largest probability, times E
        probs_TE = torch.softmax(x.reshape(-1, x.shape[-1]) @ router.weight.T, dim=-1)
        top_T, expert_T = probs_TE.max(dim=-1)
        expected_TE = torch.zeros_like(probs_TE).scatter(1, expert_T[:, None], 8.0 * top_T[:, None])
        torch.testing.assert_close(gates_TE, expected_TE)
        assert gates_TE.max() > 1.0  # unscaled gates are probabilities


def test_aux_loss_free_expert_bias_moves_towards_balance(single_rank):
    from remoe_patches.train.training_step import forward_backward, wrap_with_ddp

    rate = 0.125
    built = build_model(
        ModelConfig(router="topk", moe_aux_loss_coeff=0.0, **TINY_MODEL),
        single_rank,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=rate,
        moe_router_load_balancing_type="none",
    )
    ddp = wrap_with_ddp(built.model, built.transformer_config)
    tokens, positions, labels = batch()
    step = dict(
        tokens_BS=tokens,
        position_ids_BS=positions,
        labels_BS=labels,
        loss_mask_BS=torch.ones_like(tokens, dtype=torch.float),
    )
    routers = [m for m in built.model.modules() if isinstance(m, TopKRouter)]
    maps = {}

    def keep_routing_map(router, args, output):
        maps[router] = output[1]

    hooks = [router.register_forward_hook(keep_routing_map) for router in routers]
    forward_backward(
        [ddp],
        [step],
        num_microbatches=1,
        seq_length=TINY_MODEL["seq_length"],
        micro_batch_size=tokens.shape[0],
    )
    for hook in hooks:
        hook.remove()
    for router in routers:
        # megatron's finalize_model_grads: bias += rate * sign(mean load - load), from zero
        load_E = maps[router].sum(dim=0).float()
        expected_E = rate * torch.sign(load_E.mean() - load_E)
        torch.testing.assert_close(router.expert_bias, expected_E)
        assert torch.count_nonzero(expected_E) > 0
