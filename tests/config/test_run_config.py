"""RunConfig: built once from the flags, plain data through JSON and back, frozen parts, and
errors that name the config and the field."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from remoe_patches.cli.arguments import parse_command_line, parse_run_config
from remoe_patches.config.model_config import ConfigError, ModelConfig
from remoe_patches.model.build import HAVE_WGRAD_FUSION, build_model
from remoe_patches.config.run_config import (
    DataConfig,
    LayerOptions,
    RunConfig,
    TrainingConfig,
    split_blend,
)

from command_lines import AUTHORS_182M_REMOE, TINY_FLAGS, TINY_MOE_FLAGS

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"


@pytest.mark.parametrize("source", ["authors", "demo", "469m_remoe"])
def test_round_trip_through_json_and_yaml(source):
    argv = {
        "authors": AUTHORS_182M_REMOE,
        "demo": ["--config", str(CONFIG_DIR / "demo.yaml")],
        "469m_remoe": [
            "--config",
            str(CONFIG_DIR / "469m_remoe.yaml"),
            "--data-path",
            "d",
            "--vocab-file",
            "v.json",
            "--merge-file",
            "m.txt",
        ],
    }[source]
    config = parse_run_config(argv)
    as_json = json.loads(json.dumps(config.to_dict()))
    assert RunConfig.from_dict(as_json) == config
    assert RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


def test_the_flags_land_in_their_parts():
    config, args = parse_command_line(AUTHORS_182M_REMOE)
    assert (config.model.router, config.model.num_experts, config.model.topk) == ("relu", 8, 1)
    assert config.model.target_sparsity == pytest.approx(0.875)
    assert config.training.lr == args.lr and config.training.bf16 == bool(args.bf16)
    assert config.training.micro_batch_size == args.micro_batch_size
    assert config.data.data_path == tuple(args.data_path) and config.data.split == args.split
    assert config.checkpoint.save == args.save
    assert config.logging.log_interval == args.log_interval
    assert config.layers.recompute_modules == tuple(args.recompute_modules)


def test_train_samples_become_whole_steps():
    argv = [a for a in TINY_FLAGS if a not in ("--train-iters", "10")]
    config = parse_run_config(argv + ["--train-samples", "41", "--global-batch-size", "4"])
    assert config.training.train_iters == 11  # ceil(41 / 4)


def test_train_samples_need_a_global_batch_size(capsys):
    argv = [a for a in TINY_FLAGS if a not in ("--train-iters", "10")]
    with pytest.raises(SystemExit) as exit_info:
        parse_run_config(argv + ["--train-samples", "41"])
    assert exit_info.value.code == 2
    assert "--train-samples needs --global-batch-size" in capsys.readouterr().err


def test_parts_are_frozen_and_replace_makes_a_new_config():
    config = parse_run_config(TINY_MOE_FLAGS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.training.lr = 1.0
    changed = config.replace(training=dict(lr=0.5), model=dict(vocab_size=256))
    assert (changed.training.lr, changed.model.vocab_size) == (0.5, 256)
    assert config.training.lr == 1e-3 and config.model.vocab_size != 256
    assert changed.data is config.data


@pytest.mark.parametrize(
    "training, field",
    [
        (dict(micro_batch_size=0), "micro_batch_size"),
        (dict(global_batch_size=6, micro_batch_size=4), "global_batch_size"),
        (dict(overlap_param_gather=True, overlap_grad_reduce=True), "overlap_param_gather"),
    ],
)
def test_training_errors_name_the_field(training, field):
    values = {**dict(micro_batch_size=2, train_iters=1, lr=1e-3), **training}
    with pytest.raises(ConfigError, match=f"TrainingConfig.{field}"):
        TrainingConfig(**values).validate()


# ModelConfig's flat router fields before the router registry, with their defaults: a run saved
# then holds them all, whatever its router.
FLAT_ROUTER_DEFAULTS = dict(
    relu_l1_coeff_init=1e-8,
    relu_l1_coeff_multiplier=1.2,
    relu_load_balancing=True,
    hash_type="mod",
    hash_seed=0,
    expert_choice_capacity_factor=1.0,
    expert_choice_group="sequence",
    sparsemixer_jitter_eps=0.01,
    lory_segment_length=256,
    lory_dense_warmup_fraction=0.05,
    lory_first_segment="own_detached",
)


def saved_flat(config: RunConfig, **flat) -> dict:
    """``config`` as a run saved before the router registry wrote it (``flat``: its router's
    fields; a value None leaves the field out, as a run saved before that field existed)."""
    data = config.to_dict()
    del data["model"]["router_options"]
    data["model"].update(
        {key: value for key, value in {**FLAT_ROUTER_DEFAULTS, **flat}.items() if value is not None}
    )
    return data


def test_router_options_round_trip_and_runs_saved_with_flat_router_fields():
    relu = parse_run_config(
        [*TINY_MOE_FLAGS, "--moe-relu-routing", "--moe-relu-l1-reg-coeff-init", "1e-6"]
    )
    assert relu.to_dict()["model"]["router_options"] == dict(
        l1_coeff_init=1e-6, l1_coeff_multiplier=1.2, load_balancing=True
    )
    assert RunConfig.from_dict(json.loads(json.dumps(relu.to_dict()))) == relu
    assert RunConfig.from_dict(saved_flat(relu, relu_l1_coeff_init=1e-6)) == relu
    ec = parse_run_config(
        [
            *TINY_MOE_FLAGS,
            "--moe-router-type",
            "expert_choice",
            "--moe-expert-choice-capacity-factor",
            "2",
        ]
    )
    assert RunConfig.from_dict(saved_flat(ec, expert_choice_capacity_factor=2.0)) == ec
    with pytest.raises(ConfigError, match=r"router_options: unknown fields \['alpha'\]"):
        data = relu.to_dict()
        data["model"]["router_options"]["alpha"] = 1.2
        RunConfig.from_dict(data)


def test_hash_type_flag_and_hash_runs_saved_before_it():
    hashed = [*TINY_MOE_FLAGS, "--moe-router-type", "hash"]
    config = parse_run_config(hashed)
    assert config.model.router_options.hash_type == "mod"  # the paper's token_id mod E
    permuted = parse_run_config([*hashed, "--moe-hash-type", "random_permutation"])
    assert permuted.model.router_options.hash_type == "random_permutation"
    for run in (config, permuted):
        assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    # A hash run saved before the field existed was trained with the seeded permutation.
    old = saved_flat(config, hash_type=None)
    assert RunConfig.from_dict(old).model.router_options.hash_type == "random_permutation"
    topk = parse_run_config(TINY_MOE_FLAGS)
    assert RunConfig.from_dict(saved_flat(topk, hash_type=None)) == topk


def test_unknown_fields_in_a_saved_config_are_named():
    data = parse_run_config(TINY_FLAGS).to_dict()
    data["training"]["warp_drive"] = True
    with pytest.raises(ConfigError, match=r"RunConfig.training: unknown fields \['warp_drive'\]"):
        RunConfig.from_dict(data)


def test_fusions_only_where_their_kernels_run():
    options = LayerOptions(
        moe_permute_fusion=True, recompute_granularity="selective", recompute_modules=("moe",)
    )
    cpu = options.transformer_overrides(
        is_moe=True, cuda_available=False, transformer_engine_available=False
    )
    gpu = options.transformer_overrides(
        is_moe=True,
        cuda_available=True,
        transformer_engine_available=True,
        wgrad_fusion_available=True,
    )
    for key in (
        "masked_softmax_fusion",
        "bias_activation_fusion",
        "gradient_accumulation_fusion",
        "moe_permute_fusion",
    ):
        assert cpu[key] is False and gpu[key] is True, key
    assert cpu["recompute_modules"] == ["moe"]
    dense = options.transformer_overrides(
        is_moe=False, cuda_available=True, transformer_engine_available=True
    )
    assert "moe_permute_fusion" not in dense
    assert "recompute_granularity" not in options.without_recomputation().transformer_overrides(
        is_moe=True, cuda_available=False, transformer_engine_available=False
    )


def test_gradient_accumulation_fusion_needs_apex_kernel_not_transformer_engine(single_rank):
    """TE without apex: megatron's own output layer (a ColumnParallelLinear, in the TE spec too)
    refuses to build with the fusion unless fused_weight_gradient_mlp_cuda imports."""
    te_without_apex = LayerOptions().transformer_overrides(
        is_moe=True,
        cuda_available=True,
        transformer_engine_available=True,
        wgrad_fusion_available=False,
    )
    assert te_without_apex["gradient_accumulation_fusion"] is False
    model = ModelConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=128,
        seq_length=16,
    )
    wanted = dict(
        layernorm_epsilon=1e-5,
        gradient_accumulation_fusion=te_without_apex["gradient_accumulation_fusion"],
    )
    build_model(model, single_rank, use_transformer_engine=False, **wanted)
    if not HAVE_WGRAD_FUSION:  # what the build did before the gate (TE alone turned it on)
        with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
            build_model(
                model,
                single_rank,
                use_transformer_engine=False,
                **{**wanted, "gradient_accumulation_fusion": True},
            )


def test_lory_dense_warmup_flag_and_lory_runs_saved_before_it():
    lory_flags = [*TINY_MOE_FLAGS, "--moe-router-type", "lory", "--moe-lory-segment-length", "16"]
    lory = parse_run_config(lory_flags)
    assert lory.model.router_options.dense_warmup_fraction == 0.05  # the Lory paper's 5%
    off = parse_run_config([*lory_flags, "--moe-lory-dense-warmup-fraction", "0"])
    assert off.model.router_options.dense_warmup_fraction == 0.0
    old = saved_flat(lory, lory_segment_length=16, lory_dense_warmup_fraction=None)
    restored = RunConfig.from_dict(old).model.router_options
    assert restored.dense_warmup_fraction == 0.0  # trained without
    assert restored.segment_length == 16
    with pytest.raises(ConfigError, match="dense_warmup_fraction"):
        dataclasses.replace(
            lory.model,
            router_options=dataclasses.replace(
                lory.model.router_options, dense_warmup_fraction=1.0
            ),
        ).validate()


# --- the rules between the router and the other parts hold for a RunConfig built in code ------


def run_config_in_code(router="topk", *, layers=None, parallel=None, **model):
    """A tiny RunConfig built without flags; ``layers``/``parallel``: their fields."""
    from remoe_patches.config.model_config import ParallelConfig
    from remoe_patches.config.router_registry import ROUTERS
    from tiny import TINY_MODEL

    values = {**TINY_MODEL, "router": router}
    if ROUTERS[router].is_moe:
        values.update(num_experts=4, topk=1)
        values["router_options"] = ROUTERS[router].default_options(values.get("seq_length", 16))
    return RunConfig(
        model=ModelConfig(**{**values, **model}),
        parallel=ParallelConfig(**(parallel or {})),
        training=TrainingConfig(micro_batch_size=2, train_iters=10, lr=1e-3),
        layers=LayerOptions(**(layers or {})),
    )


def test_every_router_kind_builds_a_valid_config_in_code():
    from remoe_patches.config.router_registry import ROUTERS

    for name in ROUTERS:
        pre_softmax = {"moe_router_pre_softmax": True} if name == "topk" else {}
        config = run_config_in_code(name, layers=dict(topk_router=pre_softmax))
        assert config.validate() is config, name


FULL_RECOMPUTE = dict(
    recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
)
MOE_RECOMPUTE = dict(recompute_granularity="selective", recompute_modules=("moe",))


@pytest.mark.parametrize(
    "config, needles",
    [
        (
            lambda: run_config_in_code(
                "hash", layers=MOE_RECOMPUTE, parallel=dict(pipeline_model_parallel_size=2)
            ),
            ["ModelConfig.router=hash", "pipeline_model_parallel_size=2", "recompute"],
        ),
        (
            lambda: run_config_in_code(
                "hash", layers=FULL_RECOMPUTE, parallel=dict(pipeline_model_parallel_size=2)
            ),
            ["ModelConfig.router=hash", "recompute_granularity=full"],
        ),
        (
            lambda: run_config_in_code("relu", layers=dict(moe_permute_fusion=True)),
            ["ModelConfig.router=relu excludes moe_permute_fusion"],
        ),
        (
            lambda: run_config_in_code("expert_choice", layers=dict(moe_permute_fusion=True)),
            ["ModelConfig.router=expert_choice excludes moe_permute_fusion"],
        ),
        (
            lambda: run_config_in_code(
                layers=dict(
                    topk_router=dict(
                        moe_router_pre_softmax=True, moe_pad_expert_input_to_capacity=True
                    )
                )
            ),
            ["LayerOptions.moe_pad_expert_input_to_capacity needs moe_expert_capacity_factor"],
        ),
        (
            lambda: run_config_in_code(
                layers=dict(
                    topk_router=dict(
                        moe_router_pre_softmax=True, moe_router_enable_expert_bias=True
                    )
                )
            ),
            ["LayerOptions.moe_router_enable_expert_bias needs moe_router_score_function sigmoid"],
        ),
        (
            # k*G = 1, softmax scores, pre-softmax off (absent, transformer_config turns it on)
            lambda: run_config_in_code(layers=dict(topk_router=dict(moe_router_pre_softmax=False))),
            ["ModelConfig.topk=1 needs moe_router_pre_softmax"],
        ),
    ],
)
def test_router_rules_refuse_a_config_built_in_code(config, needles):
    with pytest.raises(ConfigError) as info:
        config().validate()
    for needle in needles:
        assert needle in str(info.value)


def test_router_rules_allow_what_they_do_not_cover():
    # PP=1, or no MoE recomputation: the hash router is fine
    run_config_in_code("hash", layers=MOE_RECOMPUTE).validate()
    run_config_in_code("hash", parallel=dict(pipeline_model_parallel_size=2)).validate()
    # megatron's TopK router: fused permutation, padding with a capacity, bias with sigmoid,
    # k=1 with sigmoid scores
    run_config_in_code(
        moe_expert_capacity_factor=1.0,
        layers=dict(
            moe_permute_fusion=True,
            topk_router=dict(
                moe_router_pre_softmax=True,
                moe_pad_expert_input_to_capacity=True,
            ),
        ),
    ).validate()
    run_config_in_code(
        layers=dict(
            topk_router=dict(
                moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True
            )
        )
    ).validate()
    run_config_in_code(topk=2).validate()  # k > 1 needs no pre-softmax
    run_config_in_code().validate()  # k = 1 with pre-softmax left to transformer_config's default


def test_a_saved_config_that_breaks_a_router_rule_still_loads():
    # from_dict does not validate: runs saved before these rules moved load as they were
    config = run_config_in_code("relu", layers=dict(moe_permute_fusion=True))
    assert RunConfig.from_dict(config.to_dict()) == config


def test_a_blend_is_checked_on_a_data_config_built_in_code():
    with pytest.raises(ConfigError, match=r"^DataConfig\.data_path mixes 'weight prefix' pairs"):
        DataConfig(data_path=("0.5", "a", "b", "c")).validate()
    with pytest.raises(ConfigError, match=r"^DataConfig\.valid_data_path gives no dataset prefix"):
        DataConfig(valid_data_path=()).validate()
    assert split_blend(("0.25", "a", "0.75", "b")) == (["a", "b"], [0.25, 0.75])
    assert split_blend(("a", "b", "c")) == (["a", "b", "c"], None)
    assert split_blend(("1", "2")) == (["2"], [1.0])  # even positions all numbers: a weight
