"""``ExpertLoad``: the window's expert shares from routing maps and from Lory's weights, counted
only in forwards that train, against direct computations; the per-layer summaries."""

from __future__ import annotations

import statistics

import pytest
import torch

from remoe_patches.train.expert_load import ExpertLoad, ExpertShares, attach
from remoe_patches.model.routers.lory_layer import LoryMLP, lory_block_spec
from remoe_patches.model.build import decoder_block_spec
from tiny import TINY_MODEL, batch, build_gpt, transformer_config

E = 8  # the tiny model's experts


def test_shares_are_the_routing_maps_means_over_the_window():
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(48, E, generator=gen) < 0.3 for _ in range(3)]
    load = ExpertLoad(num_layers=3, num_experts=E)
    for routing_map_TE in maps:
        load.record_routing_map(2, routing_map_TE)
    shares = load.window()
    every_TE = torch.cat(maps)
    assert torch.equal(shares.share_LE[1], every_TE.float().mean(dim=0))
    assert shares.unrouted_L[1] == (~every_TE.any(dim=1)).float().mean()
    assert shares.moe_layers == [2]  # layers 1 and 3 recorded nothing: NaN
    assert torch.isnan(shares.share_LE[0]).all() and torch.isnan(shares.unrouted_L[2])
    assert load.window().moe_layers == []  # the counts restart with every window


def test_per_layer_summaries():
    share_LE = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
    summary = ExpertShares(share_LE=share_LE, unrouted_L=torch.tensor([0.1, 0.0])).per_layer()
    assert summary["expert_share"] == share_LE.tolist()
    assert summary["expert_share_min"] == [0.0, 0.25]
    assert summary["expert_share_max"] == [0.5, 0.25]
    assert summary["experts_per_token"] == [1.0, 1.0]
    assert summary["tokens_without_expert"] == pytest.approx([0.1, 0.0])
    cv = statistics.pstdev([0.5, 0.25, 0.25, 0.0]) / statistics.mean([0.5, 0.25, 0.25, 0.0])
    assert summary["expert_share_cv"] == pytest.approx([cv, 0.0])


def test_hooks_count_the_routers_maps_in_training_forwards_only(single_rank):
    model = build_gpt(None)  # megatron's TopKRouter
    maps = {}

    def keep(router, args, output):
        maps.setdefault(router.layer_number, []).append(output[1].clone())

    for layer in model.decoder.layers:
        layer.mlp.router.register_forward_hook(keep)
    load = ExpertLoad(num_layers=2, num_experts=E)
    handles = attach([model], load)
    tokens, positions, labels = batch(seed=1)
    model.train()
    model(tokens, positions, None, labels=labels).sum().backward()
    with torch.no_grad():  # e.g. the first pass of activation recomputation
        model(tokens, positions, None)
    model.eval()
    model(tokens, positions, None)
    shares = load.window()
    for layer in (1, 2):
        first_TE = maps[layer][0]  # the training forward's
        assert torch.equal(shares.share_LE[layer - 1], first_TE.float().mean(dim=0))
        assert shares.share_LE[layer - 1].sum() == pytest.approx(model.config.moe_router_topk)
    for handle in handles:
        handle.remove()
    model.train()
    model(tokens, positions, None)
    assert load.window().moe_layers == []


def test_lory_reports_each_experts_mean_routing_weight(single_rank):
    from megatron.core.models.gpt import GPTModel

    config = transformer_config()
    spec = lory_block_spec(decoder_block_spec(config), 4, "own_detached")
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=TINY_MODEL["vocab_size"],
        max_sequence_length=TINY_MODEL["seq_length"],
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    weights = {}

    def keep(module, args, output):
        weights[module.layer_number] = module.routing_weights(args[0]).detach()

    for layer in model.decoder.layers:
        assert isinstance(layer.mlp, LoryMLP)
        layer.mlp.register_forward_hook(keep)
    load = ExpertLoad(num_layers=2, num_experts=E)
    attach([model], load)
    tokens, positions, labels = batch(seed=2)
    model.train()
    model(tokens, positions, None, labels=labels)
    shares = load.window()
    for layer in (1, 2):
        assert shares.share_LE[layer - 1] == pytest.approx(
            weights[layer].float().mean(dim=(0, 1)), rel=1e-5
        )
        assert shares.unrouted_L[layer - 1] == 0.0
    # the dense warm-up routes nothing
    for layer in model.decoder.layers:
        layer.mlp.dense_warmup = True
    model(tokens, positions, None, labels=labels)
    assert load.window().moe_layers == []
