"""Configurations that cannot work fail early, with one line naming the field and the fix."""

from __future__ import annotations

import pytest

from remoe_patches.config.model_config import ConfigError, ModelConfig, ParallelConfig
from remoe_patches.config.router_registry import (
    ExpertChoiceOptions,
    LoryOptions,
    ReLUOptions,
    SparseMixerOptions,
)

from tiny import TINY_MODEL


def one_line_error(fn, *needles):
    with pytest.raises(ConfigError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    return message


@pytest.mark.parametrize(
    "changes, needles",
    [
        (dict(topk=9), ["ModelConfig.topk", "num_experts=8"]),
        (dict(topk=0), ["ModelConfig.topk"]),
        (dict(granularity=3), ["ModelConfig.granularity", "does not divide the FFN width 64"]),
        (
            dict(moe_expert_capacity_factor=1.0),
            ["ModelConfig.moe_expert_capacity_factor", "dropless"],
        ),
        (dict(token_dispatcher="flex"), ["ModelConfig.token_dispatcher", "alltoall, allgather"]),
        (dict(router="softmax"), ["ModelConfig.router", "dense, topk, relu"]),
        (dict(num_query_groups=3), ["ModelConfig.num_query_groups"]),
        (
            dict(router_options=ReLUOptions(l1_coeff_multiplier=1.0)),
            ["ModelConfig.router_options.l1_coeff_multiplier"],
        ),
    ],
)
def test_bad_model_settings(changes, needles):
    one_line_error(
        lambda: ModelConfig(**{**TINY_MODEL, "router": "relu", **changes}).validate(), *needles
    )


def test_topk_router_may_drop_tokens_but_relu_may_not():
    topk = ModelConfig(**TINY_MODEL, router="topk", moe_expert_capacity_factor=1.0)
    assert topk.validate() is topk
    assert topk.transformer_config(ParallelConfig()).moe_expert_capacity_factor == 1.0
    one_line_error(
        lambda: ModelConfig(**TINY_MODEL, router="relu", moe_expert_capacity_factor=1.0).validate(),
        "ModelConfig.moe_expert_capacity_factor",
        "dropless",
    )


@pytest.mark.parametrize(
    "parallel, world, needles",
    [
        (
            ParallelConfig(tensor_model_parallel_size=2),
            3,
            ["TP=2 x PP=1 does not divide the world size 3"],
        ),
        (ParallelConfig(pipeline_model_parallel_size=4), 6, ["PP=4", "world size 6"]),
        (
            ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2),
            2,
            ["ParallelConfig.expert_model_parallel_size", "TP=2 x EP=2"],
        ),
    ],
)
def test_layouts_that_do_not_tile_the_world(parallel, world, needles):
    one_line_error(lambda: parallel.validate_world(world), *needles)


@pytest.mark.parametrize(
    "parallel, needles",
    [
        (ParallelConfig(pipeline_model_parallel_size=3), ["PP=3 does not divide num_layers=2"]),
        (ParallelConfig(expert_model_parallel_size=3), ["EP=3 does not divide the 8 experts"]),
        (
            ParallelConfig(tensor_model_parallel_size=4, sequence_parallel=True),
            ["TP=4 does not divide num_query_groups=2"],
        ),
        (ParallelConfig(tensor_model_parallel_size=2), ["ParallelConfig.sequence_parallel"]),
    ],
)
def test_layouts_that_do_not_split_the_model(parallel, needles):
    model = ModelConfig(**TINY_MODEL, router="relu")
    one_line_error(lambda: model.transformer_config(parallel), *needles)


def test_good_layouts_pass():
    ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=4).validate_world(8)
    ParallelConfig(pipeline_model_parallel_size=2).validate_world(2)


def test_unknown_preset():
    one_line_error(lambda: ModelConfig.preset("7b"), "unknown preset '7b'", "182m")


def test_fine_grained_sizes_and_target():
    cfg = ModelConfig(**TINY_MODEL, router="relu", num_experts=8, topk=1, granularity=4)
    assert (cfg.total_experts, cfg.total_topk, cfg.expert_ffn_hidden_size) == (32, 4, 16)
    assert cfg.target_sparsity == 1 - 1 / 8


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(router="hash", topk=2), "ModelConfig.topk=2"),
        (dict(router="hash", granularity=2), "ModelConfig.topk=1"),
        (
            dict(router="expert_choice", router_options=ExpertChoiceOptions(group="document")),
            "router_options.group",
        ),
        (
            dict(router="expert_choice", router_options=ExpertChoiceOptions(capacity_factor=0.0)),
            "router_options.capacity_factor",
        ),
        (dict(router="sparsemixer", topk=3), "ModelConfig.topk=3"),
        (
            dict(router="sparsemixer", router_options=SparseMixerOptions(jitter_eps=0.0)),
            "router_options.jitter_eps",
        ),
        (
            dict(router="lory", router_options=LoryOptions(segment_length=24)),
            "router_options.segment_length=24",
        ),
        (
            dict(
                router="lory", router_options=LoryOptions(segment_length=16, first_segment="last")
            ),
            "router_options.first_segment",
        ),
        (dict(router="hash", router_options=LoryOptions()), "takes HashOptions"),
        (
            dict(router="expert_choice", moe_expert_capacity_factor=1.0),
            "moe_expert_capacity_factor",
        ),
    ],
)
def test_table_2_baseline_settings_are_checked(changes, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**TINY_MODEL, "seq_length": 32, **changes}).validate()


@pytest.mark.parametrize(
    "router, parallel, needle",
    [
        (
            "expert_choice",
            dict(tensor_model_parallel_size=2, sequence_parallel=True),
            "whole sequences",
        ),
        ("lory", dict(tensor_model_parallel_size=2, sequence_parallel=True), "whole sequences"),
        ("lory", dict(expert_model_parallel_size=2), "Lory merges"),
    ],
)
def test_baselines_refuse_layouts_that_split_what_they_need(router, parallel, needle):
    with pytest.raises(ConfigError, match=needle):
        ParallelConfig(**parallel).validate_for(ModelConfig(**{**TINY_MODEL, "router": router}))
    ParallelConfig(expert_model_parallel_size=2).validate_for(
        ModelConfig(**{**TINY_MODEL, "router": "hash"})
    )
