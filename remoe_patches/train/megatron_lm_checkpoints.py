"""Checkpoints written by Megatron-LM (core_v0.16.1's ``megatron/training/checkpointing.py``) and
by the ReMoE authors' fork of it (thu-ml/ReMoE, on megatron-core 0.10), read as this project's.

Both are megatron dist-checkpoints (torch_dist) of the same megatron-core model and optimizer
sharded state (``model``, ``optimizer``), in the same run directory layout; only the common state
says things differently:

    Megatron-LM                               this project
    args (argparse.Namespace)                 run_config (RunConfig.to_dict())
    iteration                                 iteration
    args.consumed_train_samples               consumed_samples
    opt_param_scheduler                       scheduler
    model.moe_relu_l1_reg_coeff (the fork's   regularizer {l1_coeff, multiplier, target_sparsity}
      lambda, a buffer of its GPTModel)
    rng_state (one per PP x TP rank)          rng_state (one per PP x TP x DP rank): not restored
    checkpoint_version, rerun_state_machine, num_floating_point_operations_so_far: not used

``--use-checkpoint-args`` takes the model's shape from the checkpoint, as Megatron-LM's
``load_args_from_checkpoint`` does: from a Megatron-LM checkpoint its ``args`` (the flags of
``ARCHITECTURE_ARGS``), from one of this project its saved ``RunConfig.model``.
"""

from __future__ import annotations

from typing import Optional

# Megatron-LM's load_args_from_checkpoint: (flag dest, taken even when given on the command
# line), for what this project builds; then the fork's ReLU routing flags.
ARCHITECTURE_ARGS = (
    ("num_layers", False),
    ("hidden_size", False),
    ("ffn_hidden_size", False),
    ("seq_length", False),
    ("num_attention_heads", False),
    ("num_query_groups", True),
    ("group_query_attention", True),
    ("kv_channels", False),
    ("max_position_embeddings", False),
    ("position_embedding_type", True),
    ("rotary_base", True),
    ("rotary_percent", True),
    ("add_bias_linear", True),
    ("swiglu", True),
    ("untie_embeddings_and_output_weights", True),
    ("normalization", True),
    ("num_experts", True),
    ("moe_layer_freq", True),
    ("moe_ffn_hidden_size", True),
    ("moe_router_topk", True),
    ("moe_router_pre_softmax", True),
    ("moe_router_score_function", True),
    ("moe_router_topk_scaling_factor", True),
    ("moe_relu_routing", True),
    ("moe_granularity", True),
)


def is_megatron_lm_state(common: dict) -> bool:
    """The common state of a checkpoint Megatron-LM (or the fork) wrote."""
    return "args" in common and "run_config" not in common


def training_state(common: dict, target_sparsity: Optional[float]) -> dict:
    """Our common-state entries of a Megatron-LM checkpoint's: ``iteration``,
    ``consumed_samples``, ``scheduler`` and (the fork's lambda) ``regularizer``."""
    args = common["args"]
    state = dict(
        iteration=common.get("iteration", 0),
        consumed_samples=getattr(args, "consumed_train_samples", 0) or 0,
        scheduler=common.get("opt_param_scheduler"),
        regularizer=None,
    )
    l1_coeff = (common.get("model") or {}).get("moe_relu_l1_reg_coeff")
    if l1_coeff is not None and target_sparsity is not None:
        state["regularizer"] = dict(
            l1_coeff=l1_coeff,
            target_sparsity=target_sparsity,
            multiplier=float(getattr(args, "moe_relu_l1_reg_coeff_multiplier", 1.2)),
        )
    return state


def model_fields(common: dict) -> dict:
    """What a Megatron-LM checkpoint's args say of the weights' shapes, by ModelConfig field
    (``checkpointing.check_same_architecture`` compares them)."""
    args = common["args"]
    experts = getattr(args, "num_experts", None) or 0
    granularity = getattr(args, "moe_granularity", 1) or 1
    fields = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        vocab_size=getattr(args, "padded_vocab_size", None),
    )
    if getattr(args, "group_query_attention", False):
        fields["num_query_groups"] = args.num_query_groups
    if getattr(args, "ffn_hidden_size", None):
        fields["dense_ffn_hidden_size"] = args.ffn_hidden_size
    fields["is_moe"] = experts > 0
    if experts:
        fields["total_experts"] = experts * granularity
    return {name: value for name, value in fields.items() if value is not None}


def take_architecture_args(args, checkpoint_args) -> list:
    """Set ``args``' architecture flags from a Megatron-LM checkpoint's ``checkpoint_args``
    (Megatron-LM's rule: a forced one always, the others where the command line gave none);
    the dests set."""
    taken = []
    for dest, force in ARCHITECTURE_ARGS:
        if not hasattr(args, dest) or not hasattr(checkpoint_args, dest):
            continue
        value = getattr(checkpoint_args, dest)
        if value is None or (not force and getattr(args, dest) is not None):
            continue
        setattr(args, dest, value)
        taken.append(dest)
    return taken
