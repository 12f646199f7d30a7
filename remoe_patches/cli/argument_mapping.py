"""The parsed flags onto the typed ``RunConfig``, once (``run_config_from_args``).

Values are read back through the fields' flag declarations (``values_from_args``); what
Megatron-LM derives from other flags is added here; errors name flags, not fields
(``in_flag_terms``)."""

from __future__ import annotations

import re
from typing import Optional

from remoe_patches.train.batch_rampup import iterations_for
from remoe_patches.config.model_config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    RecipeFlags,
    UnbuiltFlags,
    default_router_dtype,
)
from remoe_patches.config.flag_fields import declared_flags, refusals, values_from_args
from remoe_patches.config.router_registry import MOE_GROUP, ROUTERS, TopKRouterFlags
from remoe_patches.config.run_config import (
    PARTS,
    CheckpointConfig,
    DataConfig,
    LayerOptions,
    LoggingConfig,
    RunConfig,
    TrainingConfig,
)

# Fields named in the config parts' validation errors, as their flags.
FIELD_FLAGS = {
    **{option.name: flag for part in PARTS.values() for option, flag in declared_flags(part)},
    **{
        f"router_options.{option.name}": flag
        for kind in ROUTERS.values()
        for option, flag in declared_flags(kind.options)
    },
    # LayerOptions.topk_router's keys (megatron's TopKRouter options), and the flag that puts
    # "moe" in LayerOptions.recompute_modules
    **{option.name: flag for option, flag in declared_flags(TopKRouterFlags)},
    "moe_layer_recompute": "--moe-layer-recompute",
}

MOE_FIELDS = {
    option.name
    for option, _ in declared_flags(ModelConfig)
    if option.metadata["group"] == MOE_GROUP
}
"""ModelConfig's MoE fields: a dense model keeps their defaults, whatever the flags say."""

LLAMA_RECIPE = (
    "ReMoE's builder implements the LLaMA recipe of the paper (RMSNorm, SwiGLU, RoPE, untied "
    "embeddings, no bias, no dropout)"
)


def model_config_from_args(args, *, vocab_size: Optional[int] = None) -> ModelConfig:
    """The ModelConfig the flags describe (``vocab_size``: the padded tokenizer vocabulary).

    Raises ConfigError, naming the flag, for a setting the builder cannot honour.
    """
    refused = refusals(RecipeFlags, args)
    if refused:
        raise ConfigError(f"{'; '.join(refused)}: {LLAMA_RECIPE}")
    kind = ROUTERS[args.moe_router_type if args.num_experts else "dense"]
    balancing = args.moe_router_load_balancing_type
    refused = refusals(
        UnbuiltFlags, args, groups=("model architecture", MOE_GROUP, "mixed precision")
    )
    if kind.switch_aux_loss and balancing not in ("aux_loss", "none"):
        refused.append(
            f"--moe-router-load-balancing-type {balancing} is not built for "
            f"{kind.name} routing; use aux_loss or none"
        )
    if refused:
        raise ConfigError(refused[0])
    values = {
        name: value
        for name, value in values_from_args(ModelConfig, args).items()
        if kind.is_moe or name not in MOE_FIELDS
    }
    values.update(
        router=kind.name,
        num_query_groups=(
            args.num_query_groups if args.group_query_attention else args.num_attention_heads
        ),
        # Every layer of an MoE model is an MoE layer, so the experts' width is the FFN width.
        ffn_hidden_size=args.moe_ffn_hidden_size if kind.is_moe else args.ffn_hidden_size,
        **({} if vocab_size is None else dict(vocab_size=vocab_size)),
    )
    if kind.is_moe:
        options = values_from_args(kind.options, args)
        if kind.adaptive_l1:  # ReMoE reads Megatron-LM's load-balancing flag: none is plain L1
            options["load_balancing"] = balancing != "none"
        experts = args.num_experts * args.moe_granularity
        values.update(
            moe_aux_loss_coeff=0.0 if balancing == "none" else args.moe_aux_loss_coeff,
            router_options=kind.options(**options),
            moe_router_dtype=args.moe_router_dtype or default_router_dtype(experts),
        )
    try:
        return ModelConfig(**values).validate()
    except ConfigError as error:
        raise ConfigError(in_flag_terms(error)) from None


def parallel_config_from_args(args) -> ParallelConfig:
    """The ParallelConfig the flags describe; ConfigError, naming the flag, if unsupported
    (``run_config_from_args`` checks it against the model)."""
    refused = refusals(UnbuiltFlags, args, groups=("parallelism",))
    if refused:
        raise ConfigError(refused[0])
    return ParallelConfig(**values_from_args(ParallelConfig, args))


def in_flag_terms(error: ConfigError) -> str:
    """'ModelConfig.topk=5: ... num_experts=4' as '--moe-router-topk 5: ... --num-experts 4'
    (and without a value alike); a rule of another part written as a sentence about its fields,
    'TrainingConfig.overlap_param_gather needs use_distributed_optimizer', as
    '--overlap-param-gather needs --use-distributed-optimizer'."""
    match = re.match(r"([A-Z]\w+)\.([\w.]+?)(=[^\s:]+)?(: | )(.*)", str(error))
    if (
        not match
        or match[2] not in FIELD_FLAGS
        or match[4] == ": "
        and match[1] not in ("ModelConfig", "ParallelConfig")
    ):
        return str(error)
    message = re.sub(
        r"\b([a-z_]+)(=[^\s;,]+)?",
        lambda m: _as_flag(m[1], m[2]) if m[1] in FIELD_FLAGS and (m[2] or "_" in m[1]) else m[0],
        match[5],
    )
    return f"{_as_flag(match[2], match[3])}{match[4]}{message}"


def _as_flag(field: str, value: Optional[str]) -> str:
    """``field`` (``value``: ``=X`` or None) as its flag; ``router=X`` as the flag that asks for
    router X (``--moe-relu-routing`` for ReLU, ``--moe-router-type X`` otherwise)."""
    if field == "router" and value and value[1:] in ROUTERS:
        return ROUTERS[value[1:]].routing_flag
    return f"{FIELD_FLAGS[field]}{' ' + value[1:] if value else ''}"


def layer_options_from_args(args) -> LayerOptions:
    """The TransformerConfig options the flags set that ModelConfig does not hold; derived:
    the recompute modules, and the TopK-only router options of the kinds that honour them."""
    kind = ROUTERS[args.moe_router_type] if args.num_experts is not None else None
    names = kind.layer_topk_router_options if kind else ()
    return LayerOptions(
        **{
            **values_from_args(LayerOptions, args),
            "recompute_modules": tuple(args.recompute_modules),
            "moe_permute_fusion": bool(kind and args.moe_permute_fusion),
            "topk_router": {name: getattr(args, name) for name in names},
        }
    )


def run_config_from_args(args) -> RunConfig:
    """The whole run the (completed, validated) flags describe; ConfigError names the flag."""
    train_iters = args.train_iters
    if train_iters is None:  # --train-samples: the steps that consume them (with the ramp-up's)
        train_iters = iterations_for(
            args.train_samples, args.global_batch_size, args.rampup_batch_size
        )
    try:  # the parts' own rules, then those between them (RunConfig.validate)
        return RunConfig(
            model=model_config_from_args(args),
            parallel=parallel_config_from_args(args),
            layers=layer_options_from_args(args),
            training=TrainingConfig(
                **{**values_from_args(TrainingConfig, args), "train_iters": train_iters}
            ),
            data=DataConfig(**values_from_args(DataConfig, args)),
            checkpoint=CheckpointConfig(**values_from_args(CheckpointConfig, args)),
            logging=LoggingConfig(**values_from_args(LoggingConfig, args)),
        ).validate()
    except ConfigError as error:
        raise ConfigError(in_flag_terms(error)) from None
