"""The flags' own rules, after parsing (``complete_and_validate``): Megatron-LM's derived
defaults are filled in, and what cannot work is refused in one line naming the flags. A config
part's rules on its own fields are its ``validate``'s, so that a config built in code is checked
alike."""

from __future__ import annotations

import warnings

from remoe_patches.train.batch_rampup import rampup_problem
from remoe_patches.config.router_registry import ROUTERS
from remoe_patches.config.run_config import BLEND_FIELDS
from remoe_patches.train.wandb_log import wandb_problem

REQUIRED = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "seq_length",
    "micro_batch_size",
    "lr",
)


def complete_and_validate(args, parser) -> None:
    """Fill Megatron-LM's derived defaults, then refuse what cannot work, one line each."""
    missing = [f"--{dest.replace('_', '-')}" for dest in REQUIRED if getattr(args, dest) is None]
    if missing:
        parser.error(f"missing required flag(s): {', '.join(missing)}")
    if (args.train_iters is None) == (args.train_samples is None):
        parser.error("give exactly one of --train-iters and --train-samples")

    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.num_experts is not None and args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.max_position_embeddings < args.seq_length:
        parser.error(
            f"--max-position-embeddings {args.max_position_embeddings} is shorter than "
            f"--seq-length {args.seq_length}"
        )
    _validate_moe(args, parser)
    _complete_recompute(args, parser)
    _complete_data_and_tokenizer(args, parser)

    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        warnings.warn("--sequence-parallel needs --tensor-model-parallel-size > 1; turned off")
        args.sequence_parallel = False
    if args.train_samples is not None and args.global_batch_size is None:
        parser.error("--train-samples needs --global-batch-size (steps are counted from it)")
    if args.rampup_batch_size is not None:
        # Megatron-LM asserts "expected no batch-size rampup for iteration-based training"
        if args.train_samples is None:
            parser.error(
                "--rampup-batch-size needs --train-samples (the ramp and the run are "
                "counted in samples, as in Megatron-LM); give --train-samples instead "
                "of --train-iters"
            )
        problem = rampup_problem(args.rampup_batch_size, args.global_batch_size)
        if problem:
            parser.error(problem)
    problem = wandb_problem(args, args.save)
    if problem:
        parser.error(problem)


def _validate_moe(args, parser) -> None:
    """--num-experts against the routing flags (0 reads as a dense model), then the router."""
    routing = "--moe-relu-routing" if args.moe_relu_routing else None
    if args.moe_router_type is not None:
        if routing and not ROUTERS[args.moe_router_type].adaptive_l1:
            parser.error(
                f"--moe-relu-routing contradicts --moe-router-type {args.moe_router_type}; "
                "give one of them"
            )
        routing = routing or f"--moe-router-type {args.moe_router_type}"
    experts = args.num_experts
    if experts is not None and experts < 1 and routing:
        parser.error(
            f"--num-experts {experts} contradicts {routing}: routing needs experts; give "
            f"--num-experts >= 1, or drop {routing.split()[0]} for a dense model"
        )
    if experts is not None and experts < 0:
        parser.error(
            f"--num-experts {experts} must be >= 1; leave it out (or give 0) for a dense model"
        )
    if not experts:
        args.num_experts = None
        if routing:
            parser.error(f"{routing.split()[0]} needs --num-experts")
        return
    kind = ROUTERS[args.moe_router_type or ("relu" if args.moe_relu_routing else "topk")]
    args.moe_router_type = kind.name
    args.moe_relu_routing = kind.adaptive_l1  # Megatron-LM's name of --moe-router-type relu
    if kind.adaptive_l1 and args.moe_pad_expert_input_to_capacity:
        # the TopK router options that carry it are not the ReLU router's: it would be lost
        parser.error(
            "--moe-relu-routing excludes --moe-pad-expert-input-to-capacity: ReLU "
            "routing is dropless (a token may use 0..E experts)"
        )


def _complete_recompute(args, parser) -> None:
    """Megatron-LM's recompute flags as megatron-core 0.16's granularity and module list."""
    if args.recompute_activations:
        if args.recompute_granularity == "full":
            parser.error(
                "--recompute-activations (selective) conflicts with --recompute-granularity full"
            )
        args.recompute_granularity = "selective"
    full = args.recompute_granularity == "full"  # its needs: LayerOptions.validate
    args.recompute_modules = ["core_attn"] if args.recompute_granularity == "selective" else []
    # Full recomputation already covers the MoE layers; a dense model has none.
    if args.moe_layer_recompute and not full and args.num_experts is not None:
        args.recompute_granularity = "selective"
        args.recompute_modules.append("moe")


def _complete_data_and_tokenizer(args, parser) -> None:
    tokenizer = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model")
    demo_replaces = (*BLEND_FIELDS, "mock_data", *tokenizer)
    clashing = [f"--{dest.replace('_', '-')}" for dest in demo_replaces if dest in args.given]
    if args.demo_corpus and clashing:
        parser.error(
            f"--demo-corpus sets the data and tokenizer itself; drop {', '.join(clashing)}"
        )
    if (args.data_path is not None or args.demo_corpus) and args.split is None:
        args.split = "969, 30, 1"  # Megatron-LM's default for a single blend

    if args.tokenizer_type is None and (args.vocab_file or args.merge_file):
        if not (args.vocab_file and args.merge_file):
            parser.error("GPT-2 BPE needs both --vocab-file and --merge-file")
        args.tokenizer_type = "GPT2BPETokenizer"
