"""Flags that have no effect on this machine (``ineffective_flags``): ``pretrain_gpt.py`` lists
each given one once at start-up with the reason, so nothing is silently ignored. A flag's
declaration says when and why it has none (``note``, ``needs``, ``speed_only``:
``flag_fields.flag_field``); the code here adds what depends on the machine and the router."""

from __future__ import annotations

from remoe_patches.cli.arguments import FLAG_PARTS
from remoe_patches.config.flag_fields import declared_flags, option_dest
from remoe_patches.config.router_registry import ROUTERS, TOPK_ROUTER_FLAGS

SPEED_ONLY_ON_CPU = "speed-only on GPUs; no effect on CPU"
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

    te = transformer_engine_available
    if cuda_available:  # on CPU these flags are speed_only
        picker = "transformer-engine" if te else "PyTorch's scaled_dot_product_attention"
        note("--use-flash-attn", f"{picker} picks flash attention by itself")
        note(
            "--no-gradient-accumulation-fusion",
            "the fusion needs apex's fused_weight_gradient_mlp_cuda kernel, which is not "
            "installed; it is off anyway",
            when=not wgrad_fusion_available,
        )
    note(
        "--transformer-impl",
        "transformer-engine is not installed; megatron-core's local layers are used",
        when=not te,
    )
    backend_used = "nccl" if cuda_available else "gloo"
    note(
        "--distributed-backend",
        f"{'GPU' if cuda_available else 'CPU'} runs use {backend_used}",
        when=args.distributed_backend != backend_used,
    )
    if args.num_experts is None:  # argument_checks reads --num-experts 0 as None
        given = "num_experts" in args.given
        dense = f"dense model ({'--num-experts 0' if given else 'no --num-experts'})"
        for dest in sorted(args.given):
            if dest.startswith(("moe_", "expert_")):
                note(f"--{dest.replace('_', '-')}", dense)
    else:
        note(
            "--moe-permute-fusion",
            "needs transformer-engine, which is not installed",
            when=cuda_available and not te,
        )
        note(
            "--ffn-hidden-size",
            "every layer is an MoE layer and the experts use --moe-ffn-hidden-size",
            when="moe_ffn_hidden_size" in args.given,
        )
        _note_router_flags(args, note)
    for option in DECLARED:  # what the declarations say
        flag, reason, needs = (option.metadata[key] for key in ("flag", "note", "needs"))
        note(flag, SPEED_ONLY_ON_CPU, when=option.metadata["speed_only"] and not cuda_available)
        if needs:
            want = needs[1] if len(needs) == 2 else bool  # (flag,): that flag set
            have = getattr(args, DESTS[needs[0]])
            met = want(have) if callable(want) else have == want
            generic = f"needs {needs[0]}" if want is bool else f"only used with {needs[0]} {want}"
            note(flag, (reason or generic).format(**vars(args)), when=not met)
        elif reason:
            note(flag, reason.format(**vars(args)))
    return list(found.items())


def _note_router_flags(args, note) -> None:
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
