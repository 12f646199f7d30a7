"""The parsed flags onto the typed ``RunConfig`` (``run_config_from_args``), once.

A flag the builder cannot honour is refused with a ConfigError naming the flag; errors of
``ModelConfig``/``ParallelConfig`` validation are reworded in flag terms (``--moe-router-topk 5:
...`` rather than ``ModelConfig.topk=5: ...``).
"""

from __future__ import annotations

import re
from typing import Optional

from remoe_patches.batch_rampup import iterations_for
from remoe_patches.config import ConfigError, ModelConfig, ParallelConfig
from remoe_patches.flag_fields import declared_flags, flag_dest, values_from_args
from remoe_patches.router_registry import ROUTERS
from remoe_patches.run_config import (
    CheckpointConfig,
    DataConfig,
    LayerOptions,
    LoggingConfig,
    RunConfig,
    TrainingConfig,
)

# ModelConfig/ParallelConfig fields named in their validation errors, as flags (the routers'
# options, ``ModelConfig.router_options.<field>``, carry their flags themselves).
FIELD_FLAGS = {
    "num_query_groups": "--num-query-groups",
    "num_attention_heads": "--num-attention-heads",
    "topk": "--moe-router-topk",
    "num_experts": "--num-experts",
    "hidden_size": "--hidden-size",
    "num_layers": "--num-layers",
    "granularity": "--moe-granularity",
    "token_dispatcher": "--moe-token-dispatcher-type",
    "moe_router_dtype": "--moe-router-dtype",
    "moe_expert_capacity_factor": "--moe-expert-capacity-factor",
    "seq_length": "--seq-length",
    "router": "--moe-router-type",
    **{option.name: flag for option, flag in declared_flags(ParallelConfig)},
    **{f"router_options.{option.name}": flag for kind in ROUTERS.values()
       for option, flag in declared_flags(kind.options)},
}

LLAMA_RECIPE = (
    "ReMoE's builder implements the LLaMA recipe of the paper (RMSNorm, SwiGLU, RoPE, untied "
    "embeddings, no bias, no dropout)"
)

def router_options_from_args(router: str, args):
    """``router``'s options dataclass from its flags."""
    kind = ROUTERS[router]
    values = {option.name: getattr(args, flag_dest(flag))
              for option, flag in declared_flags(kind.options)}
    if kind.adaptive_l1:  # ReMoE reads Megatron-LM's load-balancing flag: none is plain L1
        values["load_balancing"] = args.moe_router_load_balancing_type != "none"
    return kind.options(**values)


def model_config_from_args(args, *, vocab_size: Optional[int] = None) -> ModelConfig:
    """The ModelConfig the flags describe (``vocab_size``: the padded tokenizer vocabulary).

    Raises ConfigError, naming the flag, for a setting the builder cannot honour.
    """
    recipe = [
        (args.normalization != "RMSNorm",
         f"--normalization must be RMSNorm, not {args.normalization}"),
        (not args.swiglu, "--swiglu must be given"),
        (not args.untie_embeddings_and_output_weights,
         "--untie-embeddings-and-output-weights must be given (tied embeddings are not built)"),
        (args.position_embedding_type != "rope",
         f"--position-embedding-type must be rope, not {args.position_embedding_type}"),
        (args.add_bias_linear, "--disable-bias-linear must be given (linear layers have no bias)"),
        *[
            (getattr(args, dest) != 0.0,
             f"--{dest.replace('_', '-')} must be 0.0, not {getattr(args, dest)}"
             + ("" if dest in args.given else " (Megatron-LM's default)"))
            for dest in ("hidden_dropout", "attention_dropout")
        ],
    ]
    # All at once: a Megatron-LM default command line misses several of them.
    refused = [message for wrong, message in recipe if wrong]
    if refused:
        raise ConfigError(f"{'; '.join(refused)}: {LLAMA_RECIPE}")
    router = args.moe_router_type if args.num_experts else "dense"
    layer_freq = args.moe_layer_freq
    capabilities = [
        (args.rotary_percent != 1.0,
         "--rotary-percent must be 1.0: the builder rotates whole heads"),
        (router != "dense" and layer_freq != 1 and layer_freq != [1] * args.num_layers,
         "--moe-layer-freq must be 1: the builder makes every layer an MoE layer"),
        (router != "dense" and ROUTERS[router].switch_aux_loss
         and args.moe_router_load_balancing_type not in ("aux_loss", "none"),
         f"--moe-router-load-balancing-type {args.moe_router_load_balancing_type} is not built for "
         f"{router} routing; use aux_loss or none"),
    ]
    for refused, message in capabilities:
        if refused:
            raise ConfigError(message)
    moe = {}
    if router != "dense":
        without_aux_loss = args.moe_router_load_balancing_type == "none"
        moe = dict(
            num_experts=args.num_experts,
            topk=args.moe_router_topk,
            granularity=args.moe_granularity,
            moe_aux_loss_coeff=0.0 if without_aux_loss else args.moe_aux_loss_coeff,
            router_options=router_options_from_args(router, args),
            token_dispatcher=args.moe_token_dispatcher_type,
            moe_expert_capacity_factor=args.moe_expert_capacity_factor,
            moe_grouped_gemm=args.moe_grouped_gemm,
            moe_router_dtype=router_dtype(args),
        )
    config = ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=(
            args.num_query_groups if args.group_query_attention else args.num_attention_heads
        ),
        # Every layer of an MoE model is an MoE layer, so the experts' width is the FFN width.
        ffn_hidden_size=args.ffn_hidden_size if router == "dense" else args.moe_ffn_hidden_size,
        seq_length=args.seq_length,
        rotary_base=args.rotary_base,
        init_method_std=args.init_method_std,
        router=router,
        **moe,
        **({} if vocab_size is None else dict(vocab_size=vocab_size)),
    )
    try:
        return config.validate()
    except ConfigError as error:
        raise ConfigError(_in_flag_terms(error)) from None


FP32_ROUTER_FROM_EXPERTS = 32
"""megatron-core advises fp32 routing from this many experts (it warns otherwise)."""


def router_dtype(args) -> Optional[str]:
    """``--moe-router-dtype``, or the default: fp32 from 32 experts (E x G), the model's dtype
    below, for TopK and ReLU routing alike (README, 'Router precision')."""
    if args.moe_router_dtype is not None:
        return args.moe_router_dtype
    experts = (args.num_experts or 0) * args.moe_granularity
    return "fp32" if experts >= FP32_ROUTER_FROM_EXPERTS else None


def parallel_config_from_args(args) -> ParallelConfig:
    """The ParallelConfig the flags describe; ConfigError, naming the flag, if unsupported
    (``run_config_from_args`` checks it against the model)."""
    tp = args.tensor_model_parallel_size
    unsupported = [
        (args.context_parallel_size != 1,
         "--context-parallel-size must be 1 (no context parallelism)"),
        (args.expert_tensor_parallel_size not in (None, tp),
         f"--expert-tensor-parallel-size must equal --tensor-model-parallel-size ({tp})"),
        (args.num_layers_per_virtual_pipeline_stage is not None,
         "--num-layers-per-virtual-pipeline-stage is not supported (no interleaved pipeline)"),
    ]
    for refused, message in unsupported:
        if refused:
            raise ConfigError(message)
    return ParallelConfig(**values_from_args(ParallelConfig, args))


def _in_flag_terms(error: ConfigError) -> str:
    """'ModelConfig.topk=5: ... num_experts=4' as '--moe-router-topk 5: ... --num-experts 4'
    (and without a value alike)."""
    match = re.match(r"(?:ModelConfig|ParallelConfig)\.([\w.]+?)(=\S+)?: (.*)", str(error))
    if not match or match[1] not in FIELD_FLAGS:
        return str(error)
    value = f" {match[2][1:]}" if match[2] else ""
    message = re.sub(r"\b([a-z_]+)=([^\s;,]+)",
                     lambda m: f"{FIELD_FLAGS[m[1]]} {m[2]}" if m[1] in FIELD_FLAGS else m[0],
                     match[3])
    return f"{FIELD_FLAGS[match[1]]}{value}: {message}"


def layer_options_from_args(args) -> LayerOptions:
    """The TransformerConfig options the flags set that ModelConfig does not hold: recomputation,
    the norm epsilon, kv channels, the fusions and the TopK-only router options."""
    topk_router = {}
    if args.num_experts is not None:
        # megatron TopKRouter's options that the router honours (moe_aux_loss_coeff is the
        # model's: ModelConfig)
        kind = ROUTERS[args.moe_router_type]
        topk_router = {dest: getattr(args, dest) for dest in kind.topk_router_flags
                       if dest != "moe_aux_loss_coeff"}
        if kind.token_dropping:
            topk_router.update(
                moe_token_drop_policy=args.moe_token_drop_policy,
                moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity)
    return LayerOptions(
        norm_epsilon=args.norm_epsilon,
        kv_channels=args.kv_channels,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=tuple(args.recompute_modules),
        masked_softmax_fusion=args.masked_softmax_fusion,
        bias_swiglu_fusion=args.bias_swiglu_fusion,
        bias_dropout_fusion=args.bias_dropout_fusion,
        gradient_accumulation_fusion=args.gradient_accumulation_fusion,
        moe_permute_fusion=bool(args.num_experts is not None and args.moe_permute_fusion),
        transformer_impl=args.transformer_impl,
        topk_router=topk_router,
    )


def run_config_from_args(args) -> RunConfig:
    """The whole run the (completed, validated) flags describe; ConfigError names the flag."""
    train_iters = args.train_iters
    if train_iters is None:  # --train-samples: the steps that consume them (with the ramp-up's)
        train_iters = iterations_for(args.train_samples, args.global_batch_size,
                                     args.rampup_batch_size)
    model = model_config_from_args(args)
    parallel = parallel_config_from_args(args)
    try:
        parallel.validate_for(model)
    except ConfigError as error:
        raise ConfigError(_in_flag_terms(error)) from None
    return RunConfig(
        model=model,
        parallel=parallel,
        layers=layer_options_from_args(args),
        # the parts whose fields declare their flags (flag_fields), read back from them
        training=TrainingConfig(**{**values_from_args(TrainingConfig, args),
                                   "train_iters": train_iters}),
        data=DataConfig(**values_from_args(DataConfig, args)),
        checkpoint=CheckpointConfig(**values_from_args(CheckpointConfig, args)),
        logging=LoggingConfig(**values_from_args(LoggingConfig, args)),
    ).validate()
