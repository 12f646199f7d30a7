"""Flags that have no effect on this machine (``ineffective_flags``): ``pretrain_gpt.py`` lists
each given one once at start-up with the reason, so nothing is silently ignored. A flag's
declaration says what holds whatever the machine (``note``, ``needs``: ``flag_fields``)."""

from __future__ import annotations

from remoe_patches.cli.arguments import FLAG_PARTS
from remoe_patches.config.flag_fields import declared_flags, option_dest
from remoe_patches.config.router_registry import ROUTERS, TOPK_ROUTER_FLAGS

SPEED_ONLY_ON_CPU = "speed-only on GPUs; no effect on CPU"
NEEDS_TE = "needs transformer-engine, which is not installed"
NEEDS_APEX_WGRAD = (
    "the fusion needs apex's fused_weight_gradient_mlp_cuda kernel, which is not "
    "installed; it is off anyway"
)
DECLARED = [option for part in FLAG_PARTS for option, _ in declared_flags(part)]
DESTS = {option.metadata["flag"]: option_dest(option) for option in DECLARED}


def ineffective_flags(
    args,
    *,
    cuda_available: bool,
    transformer_engine_available: bool,
    wgrad_fusion_available: bool = False,
) -> list:
    """``(flag, reason)`` for each flag given (``args.given``) that has no effect here
    (``wgrad_fusion_available``: apex's fused weight-gradient kernel imports); the first reason
    found for a flag is the one listed."""
    found = {}

    def note(flag, reason, when=True):
        if DESTS[flag] in args.given and when:
            found.setdefault(flag, reason)

    on_cpu = not cuda_available
    note(
        "--use-flash-attn",
        SPEED_ONLY_ON_CPU
        if on_cpu
        else (
            "transformer-engine picks flash attention by itself"
            if transformer_engine_available
            else "PyTorch's scaled_dot_product_attention picks flash attention by itself"
        ),
    )
    for flag in (
        "--no-masked-softmax-fusion",
        "--no-bias-swiglu-fusion",
        "--no-bias-dropout-fusion",
    ):
        note(flag, SPEED_ONLY_ON_CPU, when=on_cpu)
    note(
        "--no-gradient-accumulation-fusion",
        SPEED_ONLY_ON_CPU if on_cpu else NEEDS_APEX_WGRAD,
        when=not (cuda_available and wgrad_fusion_available),
    )
    note(
        "--transformer-impl",
        "transformer-engine is not installed; megatron-core's local layers are used",
        when=not transformer_engine_available,
    )
    backend_used = "gloo" if on_cpu else "nccl"
    note(
        "--distributed-backend",
        f"{'CPU' if on_cpu else 'GPU'} runs use {backend_used}",
        when=args.distributed_backend != backend_used,
    )
    note(
        "--sequence-parallel",
        "needs --tensor-model-parallel-size > 1; turned off",
        when=args.tensor_model_parallel_size == 1,
    )
    note(
        "--async-save",
        "needs --use-persistent-ckpt-worker, as in Megatron-LM; checkpoints "
        "are written synchronously",
        when=not args.use_persistent_ckpt_worker,
    )
    note("--use-persistent-ckpt-worker", "only used with --async-save", when=not args.async_save)
    note(
        "--tensorboard-log-interval",
        "tensorboard is written at every --log-interval",
        when=args.tensorboard_dir is not None,
    )
    gpt2 = args.tokenizer_type == "GPT2BPETokenizer"
    for flag, used in (
        ("--vocab-file", gpt2),
        ("--merge-file", gpt2),
        ("--tokenizer-model", not gpt2),
    ):
        note(flag, f"unused by --tokenizer-type {args.tokenizer_type}", when=not used)

    if args.num_experts is None:  # argument_checks reads --num-experts 0 as None
        dense = (
            "dense model (--num-experts 0)"
            if "num_experts" in args.given
            else "dense model (no --num-experts)"
        )
        for dest in sorted(args.given):
            if dest.startswith("moe_") or dest.startswith("expert_"):
                note(f"--{dest.replace('_', '-')}", dense)
    else:
        _note_moe_flags(
            args,
            note,
            te_kernel_missing=not (cuda_available and transformer_engine_available),
            on_cpu=on_cpu,
        )
    for option in DECLARED:  # what the declarations say, whatever the machine
        flag, needs = option.metadata["flag"], option.metadata["needs"]
        note(flag, option.metadata["note"], when=bool(option.metadata["note"]))
        if needs:
            have = getattr(args, DESTS[needs[0]])
            if len(needs) == 1:
                note(flag, f"needs {needs[0]}", when=not have)
            else:
                note(flag, f"only used with {needs[0]} {needs[1]}", when=have != needs[1])
    return list(found.items())


def _note_moe_flags(args, note, *, te_kernel_missing: bool, on_cpu: bool) -> None:
    note("--moe-permute-fusion", SPEED_ONLY_ON_CPU if on_cpu else NEEDS_TE, when=te_kernel_missing)
    note(
        "--moe-layer-recompute",
        "full recomputation already recomputes every layer",
        when=args.recompute_granularity == "full",
    )
    note(
        "--ffn-hidden-size",
        "every layer is an MoE layer and the experts use --moe-ffn-hidden-size",
        when="moe_ffn_hidden_size" in args.given,
    )
    router = ROUTERS[args.moe_router_type]
    for kind in ROUTERS.values():  # each router's own options
        for _, flag in declared_flags(kind.options):
            note(flag, f"only used with {kind.routing_flag}", when=router is not kind)
    # megatron TopKRouter's options: the ReLU router says what it does instead
    # (--moe-router-load-balancing-type is honoured by ReLU routing too: 'none' turns the L1
    # regularizer's load balancing off, Eq. 9 instead of Eq. 10, so it gets no note)
    for dest in TOPK_ROUTER_FLAGS:
        if dest in router.topk_router_flags:
            continue
        if router.adaptive_l1:
            reason = "TopK only; " + (
                "the ReLU router uses its L1 regularizer instead"
                if dest in ("moe_router_pre_softmax", "moe_aux_loss_coeff", "moe_z_loss_coeff")
                else "the ReLU router's gates are ReLU(x W_r), unscaled and unselected"
            )
        else:
            reason = f"not used by --moe-router-type {router.name}"
        note(f"--{dest.replace('_', '-')}", reason)
    note(
        "--moe-token-drop-policy",
        "only with --moe-expert-capacity-factor (token dropping)",
        when=args.moe_expert_capacity_factor is None,
    )
