"""Command-line arguments of ``pretrain_gpt.py`` under Megatron-LM's names and meanings.

Launch scripts written for Megatron-LM's ``pretrain_gpt.py`` (core_r0.10, end of 2024), the
ReMoE authors' included, run unchanged: every flag keeps Megatron-LM's name, type, default and
meaning, and the ReMoE fork's ``--moe-relu-routing``, ``--moe-relu-l1-reg-coeff-init``,
``--moe-relu-l1-reg-coeff-multiplier`` and ``--moe-granularity`` are added, as are our own
``--config``, ``--max-skipped-steps`` and ``--demo-corpus``.

Design:

- ``parse_args`` reads ``--config FILE.yaml`` first, a flat mapping from flag names written with
  underscores (``num_layers: 12``) to values; the YAML values become defaults and the command
  line overrides them. A command-line flag also drops the YAML's value of its mutually
  exclusive partner (``--lr-warmup-iters`` replaces a YAML ``lr_warmup_fraction``).
- Errors are one line on stderr and exit code 2, like ``parser.error`` but without the usage
  text of ~120 flags. Prefixes are not accepted (``allow_abbrev=False``); an unknown flag
  or YAML key names the closest known one.
- Nothing is silently ignored. A flag is either honoured, refused with a one-line reason (a
  setting the builder cannot honour, e.g. ``--normalization LayerNorm``), or reported by
  ``ineffective_flags`` as having no effect on this machine, for the driver to list once at
  start-up. ``args.given`` holds the destinations set explicitly (command line or YAML), which
  is what "a flag given" means there.
- ``parse_command_line`` maps the flags, once, onto a ``run_config.RunConfig`` (the typed run
  configuration everything after start-up takes); ``parse_args`` is the flags alone.

Where we differ from Megatron-LM on purpose:

- ``--ffn-hidden-size`` defaults to 4 * hidden even with ``--swiglu`` (Megatron-LM shrinks it to
  about 8/3 * hidden): the paper's FFN is 4 * hidden.
- ``--fp16`` is refused (use ``--bf16``); ``--optimizer sgd`` and the WSD schedule are not offered;
  ``--tokenizer-type`` offers the three tokenizers of ``remoe_patches.tokenizer``.
- ``--micro-batch-size``, ``--lr`` and one of ``--train-iters``/``--train-samples`` are required
  at parse time (Megatron-LM fails later without them), besides the model sizes.
- ``--sequence-parallel`` at TP=1 is turned off with a warning, as Megatron-LM does.
- ``--moe-router-dtype`` defaults to fp32 from 32 experts (E x G), where megatron-core warns
  that the model's dtype is unstable; below that it is the model's dtype, as in Megatron-LM.

Environment variables exported by the authors' scripts that only matter for speed on GPUs and
that this code neither needs nor reads: ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (orders kernel launches
so communication overlaps computation) and ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``
(less allocator fragmentation).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
import warnings
from typing import NamedTuple, Optional, Sequence

import yaml

from remoe_patches.config import ConfigError, ModelConfig, ParallelConfig
from remoe_patches.run_config import (
    CheckpointConfig,
    DataConfig,
    LayerOptions,
    LoggingConfig,
    RunConfig,
    TrainingConfig,
)
from remoe_patches.tokenizer import TOKENIZER_TYPES

# Flags that Megatron-LM treats as alternatives; a command-line one drops the YAML's other one.
MUTUALLY_EXCLUSIVE = (("lr_warmup_fraction", "lr_warmup_iters"), ("train_iters", "train_samples"))

REQUIRED = (
    "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "lr"
)

# ModelConfig/ParallelConfig fields named in their validation errors, as flags.
FIELD_FLAGS = {
    "num_query_groups": "--num-query-groups",
    "num_attention_heads": "--num-attention-heads",
    "topk": "--moe-router-topk",
    "granularity": "--moe-granularity",
    "token_dispatcher": "--moe-token-dispatcher-type",
    "moe_expert_capacity_factor": "--moe-expert-capacity-factor",
    "relu_l1_coeff_init": "--moe-relu-l1-reg-coeff-init",
    "relu_l1_coeff_multiplier": "--moe-relu-l1-reg-coeff-multiplier",
    "tensor_model_parallel_size": "--tensor-model-parallel-size",
    "pipeline_model_parallel_size": "--pipeline-model-parallel-size",
    "expert_model_parallel_size": "--expert-model-parallel-size",
}

LLAMA_RECIPE = (
    "ReMoE's builder implements the LLaMA recipe of the paper (RMSNorm, SwiGLU, RoPE, untied "
    "embeddings, no bias, no dropout)"
)
SPEED_ONLY_ON_CPU = "speed-only on GPUs; no effect on CPU"
NEEDS_TE = "needs transformer-engine, which is not installed"


class MegatronArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line: the usage text of ~120 flags would bury the message."""

    error_context = ""
    """Put before every message, e.g. the YAML file whose values are being parsed."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {self.error_context}{message}\n")


def build_parser() -> MegatronArgumentParser:
    """Megatron-LM's pretrain_gpt.py flags, in Megatron-LM's groups, plus ReMoE's and ours."""
    parser = MegatronArgumentParser(
        prog="pretrain_gpt.py",
        description="Pretrain a dense, TopK-MoE or ReMoE GPT with Megatron-LM's flags.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", metavar="FILE.yaml",
        help="YAML mapping of flag names with underscores to values, used as defaults; the "
        "command line overrides them.",
    )
    _add_model_arguments(parser)
    _add_moe_arguments(parser)
    _add_parallel_arguments(parser)
    _add_data_arguments(parser)
    _add_tokenizer_arguments(parser)
    _add_training_arguments(parser)
    _add_learning_rate_arguments(parser)
    _add_mixed_precision_arguments(parser)
    _add_regularization_arguments(parser)
    _add_recompute_arguments(parser)
    _add_fused_kernel_arguments(parser)
    _add_logging_arguments(parser)
    _add_checkpointing_arguments(parser)
    _add_validation_arguments(parser)
    _add_distributed_arguments(parser)
    return parser


def _add_model_arguments(parser):
    group = parser.add_argument_group("model architecture")
    group.add_argument("--num-layers", type=int, help="Transformer layers (required).")
    group.add_argument("--hidden-size", type=int, help="Model width (required).")
    group.add_argument(
        "--ffn-hidden-size", type=int,
        help="FFN width; default 4 * hidden, also with --swiglu (the paper's FFN).",
    )
    group.add_argument("--num-attention-heads", type=int, help="Query heads (required).")
    group.add_argument("--kv-channels", type=int, help="Per-head width; default hidden / heads.")
    group.add_argument(
        "--group-query-attention", action="store_true", help="Grouped-query attention.",
    )
    group.add_argument(
        "--num-query-groups", type=int, default=1,
        help="Key/value heads with --group-query-attention.",
    )
    group.add_argument(
        "--max-position-embeddings", type=int,
        help="Longest sequence (default --seq-length); must be >= --seq-length.",
    )
    group.add_argument(
        "--position-embedding-type", default="learned_absolute",
        choices=["learned_absolute", "rope", "none"], help="Position embedding; must be rope.",
    )
    group.add_argument(
        "--no-position-embedding", action="store_false", dest="add_position_embedding",
        help="No learned absolute position embedding (implied by rope).",
    )
    group.add_argument("--rotary-base", type=int, default=10000, help="RoPE base.")
    group.add_argument(
        "--rotary-percent", type=float, default=1.0,
        help="Fraction of each head rotated; must be 1.0.",
    )
    group.add_argument(
        "--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"],
        help="Norm layer; must be RMSNorm.",
    )
    group.add_argument("--norm-epsilon", type=float, default=1e-5, help="Norm epsilon.")
    group.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (required).")
    group.add_argument(
        "--untie-embeddings-and-output-weights", action="store_true",
        help="Separate input embedding and output layer (required).",
    )
    group.add_argument(
        "--disable-bias-linear", action="store_false", dest="add_bias_linear",
        help="No bias in linear layers (required).",
    )
    group.add_argument(
        "--init-method-std", type=float, default=0.02, help="Std of the normal init.",
    )
    group.add_argument(
        "--make-vocab-size-divisible-by", type=int, default=128,
        help="Pad the vocabulary to a multiple of this times TP.",
    )
    group.add_argument(
        "--use-mcore-models", action="store_true", help="No-op: megatron-core models always."
    )
    group.add_argument(
        "--transformer-impl", default="transformer_engine", choices=["local", "transformer_engine"],
        help="Layer implementation; local when transformer-engine is not installed.",
    )


def _moe_layer_freq(text: str):
    """Megatron-LM's --moe-layer-freq: an int (every N-th layer) or a list like [1,0,1,0]."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"{text!r} is neither an int nor a list like [1,0,1,0]")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _add_moe_arguments(parser):
    group = parser.add_argument_group("mixture of experts")
    group.add_argument("--num-experts", type=int, help="Experts E; a dense model without it.")
    group.add_argument(
        "--moe-layer-freq", type=_moe_layer_freq, default=1,
        help="Which layers are MoE layers; must be 1 (all of them).",
    )
    group.add_argument(
        "--moe-ffn-hidden-size", type=int,
        help="Expert width before granularity; default the FFN width.",
    )
    group.add_argument(
        "--moe-router-topk", type=int, default=2,
        help="k active experts (TopK); with ReLU routing it sets the target sparsity 1 - k/E.",
    )
    group.add_argument(
        "--moe-router-load-balancing-type", default="aux_loss",
        choices=["aux_loss", "seq_aux_loss", "sinkhorn", "none"],
        help="TopK: aux_loss (Switch) or none; ReLU routing: anything but none keeps the L1 "
        "regularizer load-balanced (Eq. 10), none makes it plain L1 (Eq. 9).",
    )
    group.add_argument(
        "--moe-router-pre-softmax", action="store_true",
        help="TopK: softmax over all experts before the top-k (needed for k=1).",
    )
    group.add_argument(
        "--moe-aux-loss-coeff", type=float, default=0.0, help="Weight of TopK's Switch aux loss."
    )
    group.add_argument("--moe-z-loss-coeff", type=float, help="Weight of TopK's router z-loss.")
    group.add_argument(
        "--moe-router-topk-scaling-factor", type=float,
        help="TopK: multiply the chosen experts' gates by this (e.g. E with k=1 and pre-softmax, "
        "so that a gate starts near 1 rather than 1/E).",
    )
    group.add_argument(
        "--moe-router-score-function", default="softmax", choices=["softmax", "sigmoid"],
        help="TopK: the score the top-k picks from.",
    )
    group.add_argument(
        "--moe-router-enable-expert-bias", action="store_true",
        help="TopK: aux-loss-free load balancing with a per-expert bias in the top-k selection "
        "(needs --moe-router-score-function sigmoid).",
    )
    group.add_argument(
        "--moe-router-bias-update-rate", type=float, default=1e-3,
        help="TopK: step of the expert bias update (--moe-router-enable-expert-bias).",
    )
    group.add_argument(
        "--moe-input-jitter-eps", type=float,
        help="TopK: multiply the router input by uniform noise in [1-eps, 1+eps] while training.",
    )
    group.add_argument(
        "--moe-token-drop-policy", default="probs", choices=["probs", "position"],
        help="TopK with a capacity factor: drop the lowest-probability tokens or the last ones.",
    )
    group.add_argument(
        "--moe-token-dispatcher-type", default="allgather",
        choices=["allgather", "alltoall", "alltoall_seq", "flex"],
        help="Token dispatcher; alltoall or allgather (both dropless).",
    )
    group.add_argument(
        "--moe-grouped-gemm", action="store_true", help="Grouped GEMM for the experts.",
    )
    group.add_argument(
        "--moe-expert-capacity-factor", type=float,
        help="TopK token dropping capacity; unset means dropless.",
    )
    group.add_argument(
        "--moe-pad-expert-input-to-capacity", action="store_true",
        help="TopK: pad each expert's input to the capacity.",
    )
    group.add_argument(
        "--moe-layer-recompute", action="store_true",
        help="Recompute the MoE layers in the backward pass (saves memory).",
    )
    group.add_argument(
        "--moe-per-layer-logging", action="store_true", help="Log MoE statistics per layer."
    )
    group.add_argument(
        "--moe-permute-fusion", action="store_true",
        help="Fused token permutation (transformer-engine); TopK only.",
    )
    group.add_argument(
        "--moe-router-dtype", choices=["fp32", "fp64"],
        help="Router GEMM, gates and the weighting of expert outputs in this dtype instead of "
        "the model's (bf16 under --bf16). Default: fp32 from 32 experts (E x G), as "
        "megatron-core advises; the model's dtype below (README, 'Router precision').",
    )
    group.add_argument("--moe-relu-routing", action="store_true", help="ReMoE: ReLU routing.")
    group.add_argument(
        "--moe-relu-l1-reg-coeff-init", type=float, default=1e-8,
        help="ReMoE: initial L1 coefficient lambda_0.",
    )
    group.add_argument(
        "--moe-relu-l1-reg-coeff-multiplier", type=float, default=1.2,
        help="ReMoE: factor alpha of the adaptive L1 coefficient.",
    )
    group.add_argument(
        "--moe-granularity", type=int, default=1,
        help="Fine-grained experts G: E*G experts of width FFN/G, k*G active.",
    )


def _add_parallel_arguments(parser):
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP.")
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP.")
    group.add_argument(
        "--num-layers-per-virtual-pipeline-stage", type=int,
        help="Interleaved pipeline schedule; not supported.",
    )
    group.add_argument(
        "--sequence-parallel", action="store_true", help="Sequence parallelism (needs TP > 1)."
    )
    group.add_argument("--context-parallel-size", type=int, default=1, help="CP; must be 1.")
    group.add_argument("--expert-model-parallel-size", type=int, default=1, help="EP.")
    group.add_argument(
        "--expert-tensor-parallel-size", type=int, help="Expert TP; must equal TP (the default)."
    )
    group.add_argument(
        "--use-distributed-optimizer", action="store_true",
        help="Shard optimizer state over data-parallel ranks.",
    )
    group.add_argument(
        "--overlap-grad-reduce", action="store_true",
        help="Overlap gradient reduction with backward.",
    )
    group.add_argument(
        "--overlap-param-gather", action="store_true",
        help="Overlap parameter all-gather with forward.",
    )


def _add_data_arguments(parser):
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data-path", nargs="*",
        help="Dataset prefixes: one prefix, several prefixes, or a blend of 'weight prefix' pairs.",
    )
    group.add_argument(
        "--split", help="Train,valid,test weights of --data-path; default 969, 30, 1."
    )
    group.add_argument(
        "--train-data-path", nargs="*", help="Training blend (instead of --data-path).",
    )
    group.add_argument("--valid-data-path", nargs="*", help="Validation blend.")
    group.add_argument("--test-data-path", nargs="*", help="Test blend.")
    group.add_argument("--data-cache-path", help="Where dataset index caches are written.")
    group.add_argument("--mock-data", action="store_true", help="Synthetic data instead of files.")
    group.add_argument(
        "--demo-corpus", action="store_true",
        help="Ours: train on the embedded demo corpus (built and cached on first use); it sets "
        "the data path and the GPT-2 BPE tokenizer files.",
    )
    group.add_argument("--num-workers", type=int, default=2, help="Data loader worker processes.")
    group.add_argument("--seq-length", type=int, help="Tokens per sequence (required).")


def _add_tokenizer_arguments(parser):
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type", choices=TOKENIZER_TYPES,
        help="Default GPT2BPETokenizer when --vocab-file and --merge-file are given.",
    )
    group.add_argument("--vocab-file", help="GPT-2 vocab.json.")
    group.add_argument("--merge-file", help="GPT-2 merges.txt.")
    group.add_argument(
        "--tokenizer-model", help="SentencePiece .model, or a tokenizer.json (or its directory)."
    )


def _add_training_arguments(parser):
    group = parser.add_argument_group("training")
    group.add_argument(
        "--micro-batch-size", type=int, help="Sequences per rank and micro-step (required).",
    )
    group.add_argument(
        "--global-batch-size", type=int,
        help="Sequences per optimizer step; default micro batch * data-parallel size.",
    )
    group.add_argument("--train-iters", type=int, help="Optimizer steps (or --train-samples).")
    group.add_argument("--train-samples", type=int, help="Training sequences (or --train-iters).")
    group.add_argument(
        "--optimizer", default="adam", choices=["adam"], help="adam is AdamW, as in Megatron-LM."
    )
    group.add_argument("--seed", type=int, default=1234, help="Random seed.")
    group.add_argument(
        "--exit-interval", type=int, help="Stop when the step is a multiple of this.",
    )
    group.add_argument("--exit-duration-in-mins", type=int, help="Stop after this many minutes.")
    group.add_argument(
        "--exit-signal-handler", action="store_true",
        help="On SIGTERM or SIGINT (Ctrl-C), finish the step, save a checkpoint and exit 0; all "
        "ranks stop at the same iteration.",
    )
    group.add_argument(
        "--max-skipped-steps", type=_positive_int, default=10,
        help="A step with NaN/Inf loss or gradients is skipped; this many in a row stop the run.",
    )


def _add_learning_rate_arguments(parser):
    group = parser.add_argument_group("learning rate")
    group.add_argument("--lr", type=float, help="Peak learning rate (required).")
    group.add_argument(
        "--min-lr", type=float, default=0.0, help="Learning rate at the end of decay.",
    )
    group.add_argument(
        "--lr-decay-style", default="linear",
        choices=["constant", "linear", "cosine", "inverse-square-root"], help="Decay shape.",
    )
    group.add_argument("--lr-decay-iters", type=int, help="Decay steps; default --train-iters.")
    group.add_argument("--lr-warmup-iters", type=int, default=0, help="Linear warm-up steps.")
    group.add_argument(
        "--lr-warmup-fraction", type=float,
        help="Warm-up as a fraction of the decay steps (instead of --lr-warmup-iters).",
    )


def _add_mixed_precision_arguments(parser):
    group = parser.add_argument_group("mixed precision")
    group.add_argument("--bf16", action="store_true", help="bfloat16 training (GPU).")
    group.add_argument("--fp16", action="store_true", help="Not supported: use --bf16.")


def _add_regularization_arguments(parser):
    group = parser.add_argument_group("regularization")
    group.add_argument(
        "--attention-dropout", type=float, default=0.1, help="Attention dropout; must be 0.0."
    )
    group.add_argument(
        "--hidden-dropout", type=float, default=0.1, help="Hidden dropout; must be 0.0.",
    )
    group.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay.")
    group.add_argument("--clip-grad", type=float, default=1.0, help="Gradient norm clipping.")
    group.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1.")
    group.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2.")
    group.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon.")


def _add_recompute_arguments(parser):
    group = parser.add_argument_group("activation recomputation")
    group.add_argument(
        "--recompute-activations", action="store_true",
        help="Selective recomputation (core attention).",
    )
    group.add_argument(
        "--recompute-granularity", choices=["full", "selective"], help="What to recompute."
    )
    group.add_argument(
        "--recompute-method", choices=["uniform", "block"], help="Which layers (full only)."
    )
    group.add_argument("--recompute-num-layers", type=int, help="Layers per unit (full only).")


def _add_fused_kernel_arguments(parser):
    group = parser.add_argument_group("fused kernels (speed only)")
    group.add_argument("--use-flash-attn", action="store_true", help="Flash attention.")
    group.add_argument(
        "--no-masked-softmax-fusion", action="store_false", dest="masked_softmax_fusion",
        help="Unfused scale-mask-softmax.",
    )
    group.add_argument(
        "--no-bias-swiglu-fusion", action="store_false", dest="bias_swiglu_fusion",
        help="Unfused bias + SwiGLU.",
    )
    group.add_argument(
        "--no-bias-dropout-fusion", action="store_false", dest="bias_dropout_fusion",
        help="Unfused bias + dropout + residual.",
    )
    group.add_argument(
        "--no-gradient-accumulation-fusion", action="store_false",
        dest="gradient_accumulation_fusion",
        help="Unfused weight-gradient accumulation.",
    )


def _add_logging_arguments(parser):
    group = parser.add_argument_group("logging")
    group.add_argument("--log-interval", type=int, default=100, help="Steps between log lines.")
    group.add_argument("--log-throughput", action="store_true", help="No-op: always logged.")
    group.add_argument("--tensorboard-dir", help="Write TensorBoard events here.")
    group.add_argument(
        "--tensorboard-log-interval", type=int, default=1, help="Steps between TensorBoard writes."
    )
    group.add_argument(
        "--log-timers-to-tensorboard", action="store_true", help="Also write timers to TensorBoard."
    )
    group.add_argument("--wandb-project", default="", help="Not supported here.")


def _add_checkpointing_arguments(parser):
    group = parser.add_argument_group("checkpointing")
    group.add_argument("--save", help="Checkpoint directory to write.")
    group.add_argument("--load", help="Checkpoint directory to resume from (empty: start fresh).")
    group.add_argument("--save-interval", type=int, help="Steps between checkpoints.")
    group.add_argument(
        "--no-save-optim", action="store_true", default=None, help="Save no optimizer state.",
    )
    group.add_argument(
        "--no-load-optim", action="store_true", default=None, help="Load no optimizer state.",
    )
    group.add_argument(
        "--no-load-rng", action="store_true", default=None, help="Load no RNG state.",
    )
    group.add_argument(
        "--finetune", action="store_true",
        help="Load only the weights and start at step 0 (no optimizer/RNG state).",
    )
    group.add_argument(
        "--use-checkpoint-args", action="store_true", help="Take the model flags from --load."
    )
    group.add_argument(
        "--ckpt-format", default="torch_dist", choices=["torch_dist"],
        help="Checkpoint format.",
    )
    group.add_argument(
        "--dist-ckpt-strictness", default="assume_ok_unexpected",
        choices=[
            "assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected", "raise_all",
            "return_unexpected", "return_all", "ignore_all",
        ],
        help="How loading treats missing or unexpected checkpoint keys.",
    )


def _add_validation_arguments(parser):
    group = parser.add_argument_group("validation")
    group.add_argument("--eval-interval", type=int, default=1000, help="Steps between evaluations.")
    group.add_argument("--eval-iters", type=int, default=100, help="Batches per evaluation.")


def _add_distributed_arguments(parser):
    group = parser.add_argument_group("distributed")
    group.add_argument(
        "--distributed-backend", default="nccl", choices=["nccl", "gloo"],
        help="Follows the device: NCCL on GPUs, gloo on CPU.",
    )
    group.add_argument(
        "--distributed-timeout-minutes", type=int, default=10, help="Collective timeout."
    )


# ---------------------------------------------------------------------------------------------
# Parsing


class CommandLine(NamedTuple):
    """A parsed command line: the run it describes, and the flags as given (for the notes on
    flags without effect, ``ineffective_flags``)."""

    config: RunConfig
    args: argparse.Namespace


def parse_command_line(argv: Optional[Sequence[str]] = None) -> CommandLine:
    """Parse ``argv`` (default ``sys.argv[1:]``) over ``--config`` YAML defaults, validate, and
    build the ``RunConfig`` (once).

    Every error exits with code 2 and one line on stderr. ``args`` also carries ``given``
    (destinations set explicitly), ``recompute_modules`` and the Megatron-LM derived defaults
    (FFN width, max positions, split, tokenizer type).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    cli_given = _dests_given(argv)
    yaml_given = set()
    config_path = _config_path(argv)
    if config_path is not None:
        yaml_parser = build_parser()
        yaml_parser.error_context = f"{config_path}: "
        yaml_tokens = _yaml_tokens(config_path, yaml_parser)
        yaml_args = _parse_strictly(yaml_parser, yaml_tokens)
        yaml_given = _dests_given(yaml_tokens)
        for pair in map(set, MUTUALLY_EXCLUSIVE):
            if pair & cli_given:
                yaml_given -= pair - cli_given
        parser.set_defaults(**{dest: getattr(yaml_args, dest) for dest in yaml_given})
    args = _parse_strictly(parser, argv)
    args.given = frozenset(yaml_given | cli_given)
    _complete_and_validate(args, parser)
    try:
        config = run_config_from_args(args)
    except ConfigError as error:
        parser.error(str(error))
    return CommandLine(config, args)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags of ``parse_command_line`` alone (Megatron-LM's ``parse_args``)."""
    return parse_command_line(argv).args


def parse_run_config(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """The ``RunConfig`` of ``parse_command_line`` alone."""
    return parse_command_line(argv).config


def _config_path(argv) -> Optional[str]:
    pre_parser = MegatronArgumentParser(prog="pretrain_gpt.py", add_help=False, allow_abbrev=False)
    pre_parser.add_argument("--config")
    return pre_parser.parse_known_args(argv)[0].config


def _long_flags(parser) -> list:
    # argparse keeps its actions in a private list; it has been stable for as long as argparse.
    return [
        flag for action in parser._actions for flag in action.option_strings
        if flag.startswith("--")
    ]


def _parse_strictly(parser, tokens) -> argparse.Namespace:
    """Parse ``tokens``; an unknown flag is an error naming the closest known flag."""
    args, extras = parser.parse_known_args(tokens)
    if extras:
        flag = next((token for token in extras if token.startswith("-")), None)
        if flag is None:
            parser.error(f"unexpected value {extras[0]!r} (no flag takes it)")
        flag = flag.split("=", 1)[0]
        closest = difflib.get_close_matches(flag, _long_flags(parser), n=1)
        hint = f"; did you mean {closest[0]}?" if closest else " (see --help)"
        parser.error(f"unknown flag {flag}{hint}")
    return args


def _dests_given(tokens) -> set:
    """The destinations that ``tokens`` set (errors other than unknown flags exit as usual)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(tokens)[0]))


def _yaml_tokens(path: str, parser) -> list:
    """The YAML file's mapping as command-line tokens, so values go through the same types."""
    try:
        with open(path, encoding="utf-8") as file:
            mapping = yaml.safe_load(file)
    except OSError as error:
        parser.error(f"cannot read --config: {error.strerror}")
    except yaml.YAMLError as error:
        parser.error("not valid YAML: " + " ".join(str(error).split()))
    if mapping is None:
        return []
    if not isinstance(mapping, dict):
        parser.error("must be a mapping of flag names (with underscores) to values")
    actions = {
        flag[2:].replace("-", "_"): (flag, action)
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag not in ("--help", "--config")
    }
    tokens = []
    for key, value in mapping.items():
        if key not in actions:
            closest = difflib.get_close_matches(str(key), actions, n=1)
            hint = f"; did you mean {closest[0]}?" if closest else ""
            parser.error(f"unknown key {key}{hint}")
        flag, action = actions[key]
        if value is None:
            continue
        if action.nargs == 0:
            if not isinstance(value, bool):
                parser.error(f"{key} takes true or false, not {value!r}")
            tokens += [flag] if value else []
        elif isinstance(value, list):
            if action.nargs != "*":
                parser.error(f"{key} takes one value, not a list")
            tokens += [flag, *map(str, value)]
        else:
            # flag=value keeps a value that starts with '-' from reading as a flag.
            tokens.append(f"{flag}={value}")
    return tokens


def _complete_and_validate(args, parser) -> None:
    """Fill Megatron-LM's derived defaults, then refuse what cannot work, one line each."""
    missing = [f"--{dest.replace('_', '-')}" for dest in REQUIRED if getattr(args, dest) is None]
    if missing:
        parser.error(f"missing required flag(s): {', '.join(missing)}")
    if (args.train_iters is None) == (args.train_samples is None):
        parser.error("give exactly one of --train-iters and --train-samples")
    if args.fp16:
        parser.error("--fp16 is not supported: use --bf16")
    if args.lr_warmup_fraction is not None and "lr_warmup_iters" in args.given:
        parser.error("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive; give one")
    if args.global_batch_size is not None and args.global_batch_size % args.micro_batch_size:
        parser.error(
            f"--global-batch-size {args.global_batch_size} is not divisible by "
            f"--micro-batch-size {args.micro_batch_size}"
        )

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

    if args.overlap_param_gather and not args.use_distributed_optimizer:
        parser.error("--overlap-param-gather needs --use-distributed-optimizer")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        parser.error("--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)")
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        warnings.warn("--sequence-parallel needs --tensor-model-parallel-size > 1; turned off")
        args.sequence_parallel = False
    if args.num_experts and args.tensor_model_parallel_size > 1 and not args.sequence_parallel:
        parser.error("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel")
    if args.train_samples is not None and args.global_batch_size is None:
        parser.error("--train-samples needs --global-batch-size (steps are counted from it)")


def _validate_moe(args, parser) -> None:
    if args.num_experts is None:
        if args.moe_relu_routing:
            parser.error("--moe-relu-routing needs --num-experts")
        return
    if not 1 <= args.moe_router_topk <= args.num_experts:
        parser.error(
            f"--moe-router-topk {args.moe_router_topk} must be between 1 and "
            f"--num-experts {args.num_experts}"
        )
    if args.moe_granularity < 1 or args.moe_ffn_hidden_size % args.moe_granularity:
        parser.error(
            f"--moe-granularity {args.moe_granularity} does not divide the expert FFN width "
            f"{args.moe_ffn_hidden_size}"
        )
    if args.moe_relu_routing:
        # ReLU routing gives each token a variable number of experts: nothing may be dropped.
        dropless = "ReLU routing is dropless (a token may use 0..E experts)"
        if args.moe_expert_capacity_factor is not None:
            parser.error(f"--moe-relu-routing excludes --moe-expert-capacity-factor: {dropless}")
        if args.moe_pad_expert_input_to_capacity:
            parser.error(
                f"--moe-relu-routing excludes --moe-pad-expert-input-to-capacity: {dropless}"
            )
        if args.moe_token_dispatcher_type == "flex":
            parser.error(
                f"--moe-relu-routing excludes --moe-token-dispatcher-type flex: {dropless}; "
                "use alltoall or allgather"
            )
        if args.moe_permute_fusion:
            # megatron-core 0.16.1's alltoall dispatcher sizes the fused permutation's output as
            # tokens x k in the dropless case; ReLU routing gives a token up to E experts, and
            # transformer-engine's kernel would write past that buffer.
            parser.error(
                "--moe-relu-routing excludes --moe-permute-fusion: the fused permutation's buffer "
                "holds tokens x --moe-router-topk entries, and ReLU routing activates up to "
                "--num-experts per token; drop --moe-permute-fusion"
            )
    else:
        if args.moe_pad_expert_input_to_capacity and args.moe_expert_capacity_factor is None:
            parser.error("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
        top1 = args.moe_router_topk * args.moe_granularity == 1
        sinkhorn = args.moe_router_load_balancing_type == "sinkhorn"
        softmax = args.moe_router_score_function == "softmax"
        if args.moe_router_enable_expert_bias and softmax:
            parser.error("--moe-router-enable-expert-bias needs --moe-router-score-function "
                         "sigmoid (megatron-core's rule)")
        if top1 and softmax and not args.moe_router_pre_softmax and not sinkhorn:
            parser.error(
                "--moe-router-topk 1 needs --moe-router-pre-softmax (a softmax over the one chosen "
                "expert has no gradient; megatron-core refuses it)"
            )


def _complete_recompute(args, parser) -> None:
    """Megatron-LM's recompute flags as megatron-core 0.16's granularity and module list."""
    if args.recompute_activations:
        if args.recompute_granularity == "full":
            parser.error(
                "--recompute-activations (selective) conflicts with --recompute-granularity full"
            )
        args.recompute_granularity = "selective"
    full = args.recompute_granularity == "full"
    if full and (args.recompute_method is None or args.recompute_num_layers is None):
        parser.error(
            "--recompute-granularity full needs --recompute-method (uniform or block) and "
            "--recompute-num-layers"
        )
    if not full and (args.recompute_method is not None or args.recompute_num_layers is not None):
        parser.error(
            "--recompute-method and --recompute-num-layers need --recompute-granularity full"
        )
    args.recompute_modules = ["core_attn"] if args.recompute_granularity == "selective" else []
    # Full recomputation already covers the MoE layers; a dense model has none.
    if args.moe_layer_recompute and not full and args.num_experts is not None:
        args.recompute_granularity = "selective"
        args.recompute_modules.append("moe")


def _complete_data_and_tokenizer(args, parser) -> None:
    per_split = [args.train_data_path, args.valid_data_path, args.test_data_path]
    has_per_split = any(path is not None for path in per_split)
    if args.data_path is not None and has_per_split:
        parser.error("--data-path excludes --train-data-path/--valid-data-path/--test-data-path")
    if args.mock_data and (args.data_path is not None or has_per_split):
        parser.error("--mock-data excludes --data-path and the per-split data paths")
    demo_replaces = ["data_path", "train_data_path", "valid_data_path", "test_data_path",
                     "mock_data", "tokenizer_type", "vocab_file", "merge_file", "tokenizer_model"]
    clashing = [f"--{dest.replace('_', '-')}" for dest in demo_replaces if dest in args.given]
    if args.demo_corpus and clashing:
        parser.error(
            f"--demo-corpus sets the data and tokenizer itself; drop {', '.join(clashing)}"
        )
    for flag, blend in [("--data-path", args.data_path), ("--train-data-path", per_split[0]),
                        ("--valid-data-path", per_split[1]), ("--test-data-path", per_split[2])]:
        if blend is not None:
            try:
                split_blend(blend)
            except ValueError as error:
                parser.error(f"{flag}: {error}")
    if (args.data_path is not None or args.demo_corpus) and args.split is None:
        args.split = "969, 30, 1"  # Megatron-LM's default for a single blend

    if args.tokenizer_type is None and (args.vocab_file or args.merge_file):
        if not (args.vocab_file and args.merge_file):
            parser.error("GPT-2 BPE needs both --vocab-file and --merge-file")
        args.tokenizer_type = "GPT2BPETokenizer"
    if args.tokenizer_type == "GPT2BPETokenizer" and not (args.vocab_file and args.merge_file):
        parser.error("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
    model_file_types = ("SentencePieceTokenizer", "HuggingFaceTokenizer")
    if args.tokenizer_type in model_file_types and not args.tokenizer_model:
        parser.error(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
    if args.tokenizer_type is None and args.tokenizer_model:
        parser.error(f"--tokenizer-model needs --tokenizer-type {' or '.join(model_file_types)}")


def split_blend(tokens: Sequence[str]) -> tuple:
    """Megatron-LM's blend: ``(prefixes, weights)``; weights is None for bare prefixes.

    An even number of tokens whose even positions are all numbers is a ``weight prefix`` list;
    otherwise every token is a prefix. Numbers at only some even positions are an error.
    """
    tokens = list(tokens)
    if not tokens:
        raise ValueError("no dataset prefix given")
    weights = [_as_float(token) for token in tokens[0::2]] if len(tokens) % 2 == 0 else [None]
    if all(weight is not None for weight in weights):
        return tokens[1::2], weights
    if any(weight is not None for weight in weights):
        raise ValueError("mixes 'weight prefix' pairs with bare prefixes")
    return tokens, None


def _as_float(token: str) -> Optional[float]:
    try:
        return float(token)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Mapping onto our configs


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
    router = "relu" if args.moe_relu_routing else ("topk" if args.num_experts else "dense")
    layer_freq = args.moe_layer_freq
    capabilities = [
        (args.rotary_percent != 1.0,
         "--rotary-percent must be 1.0: the builder rotates whole heads"),
        (router != "dense" and layer_freq != 1 and layer_freq != [1] * args.num_layers,
         "--moe-layer-freq must be 1: the builder makes every layer an MoE layer"),
        (router == "topk" and args.moe_router_load_balancing_type not in ("aux_loss", "none"),
         f"--moe-router-load-balancing-type {args.moe_router_load_balancing_type} is not built for "
         "TopK routing; use aux_loss or none"),
    ]
    for refused, message in capabilities:
        if refused:
            raise ConfigError(message)
    moe = {}
    if router != "dense":
        topk_without_aux_loss = router == "topk" and args.moe_router_load_balancing_type == "none"
        moe = dict(
            num_experts=args.num_experts,
            topk=args.moe_router_topk,
            granularity=args.moe_granularity,
            moe_aux_loss_coeff=0.0 if topk_without_aux_loss else args.moe_aux_loss_coeff,
            relu_l1_coeff_init=args.moe_relu_l1_reg_coeff_init,
            relu_l1_coeff_multiplier=args.moe_relu_l1_reg_coeff_multiplier,
            relu_load_balancing=args.moe_router_load_balancing_type != "none",
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
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
    )
    return parallel


def _in_flag_terms(error: ConfigError) -> str:
    """'ModelConfig.topk: ...' as '--moe-router-topk: ...'."""
    match = re.match(r"(?:ModelConfig|ParallelConfig)\.(\w+): (.*)", str(error))
    if match and match[1] in FIELD_FLAGS:
        return f"{FIELD_FLAGS[match[1]]}: {match[2]}"
    return str(error)


def layer_options_from_args(args) -> LayerOptions:
    """The TransformerConfig options the flags set that ModelConfig does not hold: recomputation,
    the norm epsilon, kv channels, the fusions and the TopK-only router options."""
    topk_router = {}
    if args.num_experts is not None and not args.moe_relu_routing:
        topk_router = dict(
            moe_router_pre_softmax=args.moe_router_pre_softmax,
            moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
            moe_router_score_function=args.moe_router_score_function,
            moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=args.moe_router_bias_update_rate,
            moe_input_jitter_eps=args.moe_input_jitter_eps,
            moe_token_drop_policy=args.moe_token_drop_policy,
            moe_z_loss_coeff=args.moe_z_loss_coeff,
            moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity,
        )
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
    def tuple_or_none(value):
        return None if value is None else tuple(value)

    train_iters = args.train_iters
    if train_iters is None:  # --train-samples
        train_iters = -(-args.train_samples // args.global_batch_size)
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
        training=TrainingConfig(
            micro_batch_size=args.micro_batch_size,
            global_batch_size=args.global_batch_size,
            train_iters=train_iters,
            lr=args.lr,
            min_lr=args.min_lr,
            lr_decay_style=args.lr_decay_style,
            lr_decay_iters=args.lr_decay_iters,
            lr_warmup_iters=args.lr_warmup_iters,
            lr_warmup_fraction=args.lr_warmup_fraction,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            seed=args.seed,
            bf16=bool(args.bf16),
            use_distributed_optimizer=bool(args.use_distributed_optimizer),
            overlap_grad_reduce=bool(args.overlap_grad_reduce),
            overlap_param_gather=bool(args.overlap_param_gather),
            max_skipped_steps=args.max_skipped_steps,
            exit_interval=args.exit_interval,
            exit_duration_in_mins=args.exit_duration_in_mins,
            exit_signal_handler=bool(args.exit_signal_handler),
            distributed_timeout_minutes=args.distributed_timeout_minutes,
        ),
        data=DataConfig(
            data_path=tuple_or_none(args.data_path),
            split=args.split,
            train_data_path=tuple_or_none(args.train_data_path),
            valid_data_path=tuple_or_none(args.valid_data_path),
            test_data_path=tuple_or_none(args.test_data_path),
            mock_data=bool(args.mock_data),
            data_cache_path=args.data_cache_path,
            demo_corpus=bool(args.demo_corpus),
            tokenizer_type=args.tokenizer_type,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
            tokenizer_model=args.tokenizer_model,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        ),
        checkpoint=CheckpointConfig(
            save=args.save,
            load=args.load,
            save_interval=args.save_interval,
            finetune=bool(args.finetune),
            no_load_optim=bool(args.no_load_optim),
            no_load_rng=bool(args.no_load_rng),
            no_save_optim=bool(args.no_save_optim),
        ),
        logging=LoggingConfig(
            log_interval=args.log_interval,
            tensorboard_dir=args.tensorboard_dir,
            eval_interval=args.eval_interval,
            eval_iters=args.eval_iters,
        ),
    ).validate()


# ---------------------------------------------------------------------------------------------
# Flags without effect


def ineffective_flags(
    args, *, cuda_available: bool, transformer_engine_available: bool
) -> list:
    """``(flag, reason)`` for each flag given (``args.given``) that has no effect here."""
    given = args.given
    found = {}

    def note(dest, flag, reason, when=True):
        if dest in given and when and flag not in found:
            found[flag] = reason

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
    note("gradient_accumulation_fusion", "--no-gradient-accumulation-fusion", needs_te_kernel,
         when=te_missing)
    note("transformer_impl", "--transformer-impl",
         "transformer-engine is not installed; megatron-core's local layers are used",
         when=not transformer_engine_available)
    backend_used = "gloo" if on_cpu else "nccl"
    note("distributed_backend", "--distributed-backend",
         f"{'CPU' if on_cpu else 'GPU'} runs use {backend_used}",
         when=args.distributed_backend != backend_used)
    note("use_mcore_models", "--use-mcore-models",
         "always on: megatron-core models are the only ones")
    note("log_throughput", "--log-throughput", "always on: throughput is always logged")
    note("sequence_parallel", "--sequence-parallel",
         "needs --tensor-model-parallel-size > 1; turned off",
         when=args.tensor_model_parallel_size == 1)
    note("wandb_project", "--wandb-project",
         "Weights & Biases is not supported here; use --tensorboard-dir")
    note("num_query_groups", "--num-query-groups", "needs --group-query-attention",
         when=not args.group_query_attention)
    for dest in ("tensorboard_log_interval", "log_timers_to_tensorboard"):
        note(dest, f"--{dest.replace('_', '-')}", "needs --tensorboard-dir",
             when=args.tensorboard_dir is None)
    note("num_workers", "--num-workers", "batches are read in the training process")
    note("use_checkpoint_args", "--use-checkpoint-args",
         "the model comes from the command line and YAML; a mismatching checkpoint fails to load")
    note("dist_ckpt_strictness", "--dist-ckpt-strictness",
         "checkpoints always load strictly (every saved tensor must fit the model)")
    note("moe_per_layer_logging", "--moe-per-layer-logging",
         "always on: per-layer sparsity is always logged")
    note("log_timers_to_tensorboard", "--log-timers-to-tensorboard", "no timers are logged",
         when=args.tensorboard_dir is not None)
    note("tensorboard_log_interval", "--tensorboard-log-interval",
         "tensorboard is written at every --log-interval", when=args.tensorboard_dir is not None)
    gpt2 = args.tokenizer_type == "GPT2BPETokenizer"
    unused_by = f"unused by --tokenizer-type {args.tokenizer_type}"
    note("vocab_file", "--vocab-file", unused_by, when=not gpt2)
    note("merge_file", "--merge-file", unused_by, when=not gpt2)
    note("tokenizer_model", "--tokenizer-model", unused_by, when=gpt2)

    if args.num_experts is None:
        for dest in sorted(given):
            if dest.startswith("moe_") or dest.startswith("expert_"):
                note(dest, f"--{dest.replace('_', '-')}", "dense model (no --num-experts)")
        return list(found.items())

    note("moe_permute_fusion", "--moe-permute-fusion", needs_te_kernel, when=te_missing)
    note("moe_layer_recompute", "--moe-layer-recompute",
         "full recomputation already recomputes every layer",
         when=args.recompute_granularity == "full")
    note("ffn_hidden_size", "--ffn-hidden-size",
         "every layer is an MoE layer and the experts use --moe-ffn-hidden-size",
         when="moe_ffn_hidden_size" in given)
    relu = args.moe_relu_routing
    for dest in ("moe_relu_l1_reg_coeff_init", "moe_relu_l1_reg_coeff_multiplier"):
        note(dest, f"--{dest.replace('_', '-')}", "only used with --moe-relu-routing",
             when=not relu)
    instead = "the ReLU router uses its L1 regularizer instead"
    note("moe_router_pre_softmax", "--moe-router-pre-softmax", f"TopK only; {instead}", when=relu)
    note("moe_aux_loss_coeff", "--moe-aux-loss-coeff", f"TopK only; {instead}", when=relu)
    note("moe_z_loss_coeff", "--moe-z-loss-coeff", f"TopK only; {instead}", when=relu)
    # --moe-router-load-balancing-type is honoured by ReLU routing too: 'none' turns the L1
    # regularizer's load balancing off (Eq. 9 instead of Eq. 10), so it gets no note.
    gates = "the ReLU router's gates are ReLU(x W_r), unscaled and unselected"
    for dest in ("moe_router_topk_scaling_factor", "moe_router_score_function",
                 "moe_router_enable_expert_bias", "moe_router_bias_update_rate",
                 "moe_input_jitter_eps"):
        note(dest, f"--{dest.replace('_', '-')}", f"TopK only; {gates}", when=relu)
    note("moe_token_drop_policy", "--moe-token-drop-policy",
         "only with --moe-expert-capacity-factor (token dropping)",
         when=args.moe_expert_capacity_factor is None)
    note("moe_router_bias_update_rate", "--moe-router-bias-update-rate",
         "needs --moe-router-enable-expert-bias", when=not args.moe_router_enable_expert_bias)
    return list(found.items())
