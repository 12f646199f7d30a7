"""Flags that have no effect on this machine (``ineffective_flags``): ``pretrain_gpt.py`` lists
each given one once at start-up with the reason, so nothing is silently ignored."""

from __future__ import annotations

from remoe_patches.arguments import FLAG_PARTS
from remoe_patches.flag_fields import declared_flags, flag_dest
from remoe_patches.router_registry import ROUTERS, TOPK_ROUTER_FLAGS

SPEED_ONLY_ON_CPU = "speed-only on GPUs; no effect on CPU"
NEEDS_TE = "needs transformer-engine, which is not installed"
NEEDS_APEX_WGRAD = ("the fusion needs apex's fused_weight_gradient_mlp_cuda kernel, which is not "
                    "installed; it is off anyway")


def ineffective_flags(
    args, *, cuda_available: bool, transformer_engine_available: bool,
    wgrad_fusion_available: bool = False,
) -> list:
    """``(flag, reason)`` for each flag given (``args.given``) that has no effect here
    (``wgrad_fusion_available``: apex's fused weight-gradient kernel imports)."""
    given = args.given
    found = {}

    def note(dest, flag, reason, when=True):
        if dest in given and when and flag not in found:
            found[flag] = reason

    for part in FLAG_PARTS:  # the flags declared without effect
        for option, flag in declared_flags(part):
            if option.metadata["note"]:
                note(option.metadata["argparse"].get("dest") or flag_dest(flag), flag,
                     option.metadata["note"])
    on_cpu = not cuda_available
    needs_te_kernel = SPEED_ONLY_ON_CPU if on_cpu else NEEDS_TE
    te_missing = not (cuda_available and transformer_engine_available)

    note("use_flash_attn", "--use-flash-attn",
         SPEED_ONLY_ON_CPU if on_cpu else
         ("transformer-engine picks flash attention by itself" if transformer_engine_available
          else "PyTorch's scaled_dot_product_attention picks flash attention by itself"))
    for dest, flag in [
        ("masked_softmax_fusion", "--no-masked-softmax-fusion"),
        ("bias_swiglu_fusion", "--no-bias-swiglu-fusion"),
        ("bias_dropout_fusion", "--no-bias-dropout-fusion"),
    ]:
        note(dest, flag, SPEED_ONLY_ON_CPU, when=on_cpu)
    note("gradient_accumulation_fusion", "--no-gradient-accumulation-fusion",
         SPEED_ONLY_ON_CPU if on_cpu else NEEDS_APEX_WGRAD,
         when=not (cuda_available and wgrad_fusion_available))
    note("transformer_impl", "--transformer-impl",
         "transformer-engine is not installed; megatron-core's local layers are used",
         when=not transformer_engine_available)
    backend_used = "gloo" if on_cpu else "nccl"
    note("distributed_backend", "--distributed-backend",
         f"{'CPU' if on_cpu else 'GPU'} runs use {backend_used}",
         when=args.distributed_backend != backend_used)
    note("sequence_parallel", "--sequence-parallel",
         "needs --tensor-model-parallel-size > 1; turned off",
         when=args.tensor_model_parallel_size == 1)
    note("num_query_groups", "--num-query-groups", "needs --group-query-attention",
         when=not args.group_query_attention)
    for dest in ("tensorboard_log_interval", "log_timers_to_tensorboard",
                 "log_memory_to_tensorboard"):
        note(dest, f"--{dest.replace('_', '-')}", "needs --tensorboard-dir",
             when=args.tensorboard_dir is None)
    note("async_save", "--async-save", "needs --use-persistent-ckpt-worker, as in Megatron-LM; "
         "checkpoints are written synchronously", when=not args.use_persistent_ckpt_worker)
    note("use_persistent_ckpt_worker", "--use-persistent-ckpt-worker", "only used with "
         "--async-save", when=not args.async_save)
    note("tensorboard_log_interval", "--tensorboard-log-interval",
         "tensorboard is written at every --log-interval", when=args.tensorboard_dir is not None)
    gpt2 = args.tokenizer_type == "GPT2BPETokenizer"
    unused_by = f"unused by --tokenizer-type {args.tokenizer_type}"
    note("vocab_file", "--vocab-file", unused_by, when=not gpt2)
    note("merge_file", "--merge-file", unused_by, when=not gpt2)
    note("tokenizer_model", "--tokenizer-model", unused_by, when=gpt2)
    for dest in ("lr_wsd_decay_style", "lr_wsd_decay_iters"):
        note(dest, f"--{dest.replace('_', '-')}", "only used with --lr-decay-style WSD",
             when=args.lr_decay_style != "WSD")

    if args.num_experts is None:  # argument_checks reads --num-experts 0 as None
        dense = ("dense model (--num-experts 0)" if "num_experts" in given
                 else "dense model (no --num-experts)")
        for dest in sorted(given):
            if dest.startswith("moe_") or dest.startswith("expert_"):
                note(dest, f"--{dest.replace('_', '-')}", dense)
        return list(found.items())

    note("moe_permute_fusion", "--moe-permute-fusion", needs_te_kernel, when=te_missing)
    note("moe_layer_recompute", "--moe-layer-recompute",
         "full recomputation already recomputes every layer",
         when=args.recompute_granularity == "full")
    note("ffn_hidden_size", "--ffn-hidden-size",
         "every layer is an MoE layer and the experts use --moe-ffn-hidden-size",
         when="moe_ffn_hidden_size" in given)
    router = getattr(args, "moe_router_type", None) if args.num_experts else None
    for kind in ROUTERS.values():  # each router's own options
        owner = "--moe-relu-routing" if kind.adaptive_l1 else f"--moe-router-type {kind.name}"
        for option, flag in declared_flags(kind.options):
            note(flag_dest(flag), flag, f"only used with {owner}", when=router != kind.name)
            if option.metadata["needs"]:  # an option of its router's (router == kind.name)
                needed, value = option.metadata["needs"]
                note(flag_dest(flag), flag, f"only used with {needed} {value}",
                     when=getattr(args, flag_dest(needed)) != value)
    # megatron TopKRouter's options: the ReLU router says what it does instead
    # (--moe-router-load-balancing-type is honoured by ReLU routing too: 'none' turns the L1
    # regularizer's load balancing off, Eq. 9 instead of Eq. 10, so it gets no note)
    kind = ROUTERS.get(router)
    for dest in TOPK_ROUTER_FLAGS:
        if kind is None or dest in kind.topk_router_flags:
            continue
        if kind.adaptive_l1:
            reason = "TopK only; " + (
                "the ReLU router uses its L1 regularizer instead"
                if dest in ("moe_router_pre_softmax", "moe_aux_loss_coeff", "moe_z_loss_coeff")
                else "the ReLU router's gates are ReLU(x W_r), unscaled and unselected")
        else:
            reason = f"not used by --moe-router-type {router}"
        note(dest, f"--{dest.replace('_', '-')}", reason)
    note("moe_token_drop_policy", "--moe-token-drop-policy",
         "only with --moe-expert-capacity-factor (token dropping)",
         when=args.moe_expert_capacity_factor is None)
    note("moe_router_bias_update_rate", "--moe-router-bias-update-rate",
         "needs --moe-router-enable-expert-bias", when=not args.moe_router_enable_expert_bias)
    return list(found.items())
