"""``RunConfig``: everything one training run is, as typed, documented, plain data.

``pretrain_gpt.py`` builds it once from Megatron-LM-style flags and YAML
(``arguments.parse_run_config``); training, evaluation, export, analysis and the benchmark take
it, and every checkpoint stores it (``to_dict``: nested dicts of numbers, strings, lists and
None, never pickled objects), so a checkpoint is rebuilt from what it says (``from_dict``).

Parts: ``model`` (``model_config.ModelConfig``: the architecture and routing), ``parallel``
(``model_config.ParallelConfig``: the layout), ``layers`` (TransformerConfig options that do not
change the model's function: recomputation, fused kernels, TopK-router extras), ``training``
(batches, steps, optimizer, schedule, precision, when to stop), ``data`` (datasets and tokenizer),
``checkpoint`` and ``logging``. The fields of every part declare their ``pretrain_gpt.py`` flags
(``flag_fields.flag_field``): the parser lists them and the flags map onto them from there;
``OtherFlags`` declares the Megatron-LM flags that set no field of their own.
Each part is frozen: a change is a new config (``dataclasses.replace``), so nothing is mutated
mid-run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from remoe_patches.config.model_config import ARCH, ConfigError, ModelConfig, ParallelConfig
from remoe_patches.config.flag_fields import flag_field, nonnegative_int, positive_int
from remoe_patches.config.router_registry import MOE_GROUP, ROUTERS
from remoe_patches.data.tokenizer import TOKENIZER_TYPES


RECOMPUTE, FUSED = "activation recomputation", "fused kernels (speed only)"
UNUSED_BY_TOKENIZER = "unused by --tokenizer-type {tokenizer_type}"


@dataclass(frozen=True)
class LayerOptions:
    """TransformerConfig settings beyond ``ModelConfig``: how the layers compute, not what."""

    norm_epsilon: float = flag_field(1e-5, flag="--norm-epsilon", group=ARCH, help="Norm epsilon.")
    """RMSNorm epsilon."""
    kv_channels: Optional[int] = flag_field(
        None,
        flag="--kv-channels",
        group=ARCH,
        type=int,
        help="Per-head width; default hidden / heads.",
    )
    """Width of one attention head; default hidden / heads."""
    recompute_granularity: Optional[str] = flag_field(
        None,
        flag="--recompute-granularity",
        group=RECOMPUTE,
        choices=["full", "selective"],
        help="What to recompute.",
    )
    """None, 'selective' (the modules below) or 'full' (whole layers)."""
    recompute_method: Optional[str] = flag_field(
        None,
        flag="--recompute-method",
        group=RECOMPUTE,
        choices=["uniform", "block"],
        help="Which layers (full only).",
    )
    """'uniform' or 'block' (full recomputation only)."""
    recompute_num_layers: Optional[int] = flag_field(
        None,
        flag="--recompute-num-layers",
        group=RECOMPUTE,
        type=int,
        help="Layers per unit (full only).",
    )
    """Layers per recomputed unit (full recomputation only)."""
    recompute_modules: tuple = ()
    """Selective recomputation's modules: 'core_attn', 'moe'."""
    masked_softmax_fusion: bool = flag_field(
        True,
        flag="--no-masked-softmax-fusion",
        group=FUSED,
        action="store_false",
        dest="masked_softmax_fusion",
        speed_only=True,
        help="Unfused scale-mask-softmax.",
    )
    bias_swiglu_fusion: bool = flag_field(
        True,
        flag="--no-bias-swiglu-fusion",
        group=FUSED,
        action="store_false",
        dest="bias_swiglu_fusion",
        speed_only=True,
        help="Unfused bias + SwiGLU.",
    )
    bias_dropout_fusion: bool = flag_field(
        True,
        flag="--no-bias-dropout-fusion",
        group=FUSED,
        action="store_false",
        dest="bias_dropout_fusion",
        speed_only=True,
        help="Unfused bias + dropout + residual.",
    )
    gradient_accumulation_fusion: bool = flag_field(
        True,
        flag="--no-gradient-accumulation-fusion",
        group=FUSED,
        action="store_false",
        dest="gradient_accumulation_fusion",
        speed_only=True,
        help="Unfused weight-gradient accumulation.",
    )
    moe_permute_fusion: bool = flag_field(
        False,
        flag="--moe-permute-fusion",
        group=MOE_GROUP,
        action="store_true",
        speed_only=True,
        help="Fused token permutation (transformer-engine); TopK only.",
    )
    """The fusions wanted; each is on only where its kernel exists (see
    ``transformer_overrides``)."""
    transformer_impl: str = flag_field(
        "transformer_engine",
        flag="--transformer-impl",
        group=ARCH,
        choices=["local", "transformer_engine"],
        help="Layer implementation; local when transformer-engine is not installed.",
    )
    """'transformer_engine' (when installed) or 'local' (megatron-core's own layers). A run saves
    the implementation it used (``build.transformer_impl_in_use``), not the one asked for."""
    topk_router: dict = field(default_factory=dict)
    """TopK-only TransformerConfig options (pre-softmax, scaling factor, score function, expert
    bias, jitter, token-drop policy, z-loss, capacity padding); empty for dense and ReLU models."""

    def transformer_overrides(
        self,
        *,
        is_moe: bool,
        cuda_available: bool,
        transformer_engine_available: bool,
        wgrad_fusion_available: bool = False,
    ) -> dict:
        """The TransformerConfig keyword arguments, as ``ModelConfig.transformer_config(parallel,
        **overrides)`` takes them; a fusion is on only where its kernel runs.

        ``wgrad_fusion_available``: apex's ``fused_weight_gradient_mlp_cuda`` imports
        (``model.HAVE_WGRAD_FUSION``). megatron's own ColumnParallelLinear (the output layer, in
        the TE spec too) refuses to build with gradient_accumulation_fusion without it, so TE
        alone is not enough.
        """
        te_on_gpu = cuda_available and transformer_engine_available
        overrides = dict(
            layernorm_epsilon=self.norm_epsilon,
            masked_softmax_fusion=self.masked_softmax_fusion and cuda_available,
            bias_activation_fusion=self.bias_swiglu_fusion and cuda_available,
            bias_dropout_fusion=self.bias_dropout_fusion and cuda_available,
            gradient_accumulation_fusion=(
                self.gradient_accumulation_fusion and cuda_available and wgrad_fusion_available
            ),
        )
        if self.kv_channels is not None:
            overrides["kv_channels"] = self.kv_channels
        if self.recompute_granularity == "full":
            overrides.update(
                recompute_granularity="full",
                recompute_method=self.recompute_method,
                recompute_num_layers=self.recompute_num_layers,
            )
        elif self.recompute_granularity == "selective":
            overrides.update(
                recompute_granularity="selective", recompute_modules=list(self.recompute_modules)
            )
        if is_moe:
            overrides.update(moe_permute_fusion=self.moe_permute_fusion and te_on_gpu)
        overrides.update(self.topk_router)
        return overrides

    def without_recomputation(self) -> "LayerOptions":
        """For inference: nothing to recompute without a backward pass."""
        return dataclasses.replace(
            self,
            recompute_granularity=None,
            recompute_method=None,
            recompute_num_layers=None,
            recompute_modules=(),
        )

    def validate(self) -> "LayerOptions":
        full = self.recompute_granularity == "full"
        given = [self.recompute_method is not None, self.recompute_num_layers is not None]
        sentences = [
            (
                not full or all(given),
                "recompute_granularity=full needs recompute_method (uniform or block) and "
                "recompute_num_layers",
            ),
            (
                full or not any(given),
                "recompute_method and recompute_num_layers need recompute_granularity=full",
            ),
            (
                not self.topk_router.get("moe_router_enable_expert_bias")
                or self.topk_router.get("moe_router_score_function", "softmax") != "softmax",
                "moe_router_enable_expert_bias needs moe_router_score_function sigmoid "
                "(megatron-core's rule)",
            ),
        ]
        _refuse_first("LayerOptions", sentences)
        return self


@dataclass(frozen=True)
class TrainingConfig:
    """Batches, steps, optimizer (AdamW), LR schedule, precision and when to stop."""

    micro_batch_size: int = flag_field(
        flag="--micro-batch-size",
        group="training",
        type=int,
        help="Sequences per rank and micro-step (required).",
    )
    train_iters: int = flag_field(
        flag="--train-iters",
        group="training",
        type=int,
        help="Optimizer steps (or --train-samples).",
    )
    lr: float = flag_field(
        flag="--lr", group="learning rate", type=float, help="Peak learning rate (required)."
    )
    global_batch_size: Optional[int] = flag_field(
        None,
        flag="--global-batch-size",
        group="training",
        type=int,
        help="Sequences per optimizer step; default micro batch * data-parallel size.",
    )
    rampup_batch_size: Optional[tuple] = flag_field(
        None,
        flag="--rampup-batch-size",
        group="training",
        type=int,
        nargs=3,
        metavar=("START", "INCREMENT", "RAMPUP_SAMPLES"),
        help="Megatron-LM's batch-size ramp-up (needs --train-samples): the global batch starts "
        "at START and grows by INCREMENT every RAMPUP_SAMPLES / ((--global-batch-size - START) "
        "/ INCREMENT) samples, reaching --global-batch-size after RAMPUP_SAMPLES.",
    )
    """(START, INCREMENT, RAMPUP_SAMPLES), or None for a constant batch; megatron-core's
    calculator gives each step's batch from the consumed samples (``batch_rampup``), and
    ``train_iters`` counts the steps that consume --train-samples."""
    min_lr: float = flag_field(
        0.0, flag="--min-lr", group="learning rate", help="Learning rate at the end of decay."
    )
    lr_decay_style: str = flag_field(
        "linear",
        flag="--lr-decay-style",
        group="learning rate",
        help="Decay shape; WSD: warm-up, stable at --lr, then the last --lr-wsd-decay-iters "
        "anneal to --min-lr.",
        choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
    )
    lr_wsd_decay_style: str = flag_field(
        "exponential",
        flag="--lr-wsd-decay-style",
        group="learning rate",
        needs=("--lr-decay-style", "WSD"),
        choices=["exponential", "linear", "cosine", "minus_sqrt"],
        help="WSD: the anneal's shape (Megatron-LM's default: exponential).",
    )
    lr_wsd_decay_iters: Optional[int] = flag_field(
        None,
        flag="--lr-wsd-decay-iters",
        group="learning rate",
        type=int,
        needs=("--lr-decay-style", "WSD"),
        help="WSD: the iterations of the anneal, at the end of the decay (required with WSD).",
    )
    lr_decay_iters: Optional[int] = flag_field(
        None,
        flag="--lr-decay-iters",
        group="learning rate",
        type=int,
        help="Decay steps; default --train-iters.",
    )
    lr_warmup_iters: int = flag_field(
        0, flag="--lr-warmup-iters", group="learning rate", help="Linear warm-up steps."
    )
    lr_warmup_fraction: Optional[float] = flag_field(
        None,
        flag="--lr-warmup-fraction",
        group="learning rate",
        type=float,
        help="Warm-up as a fraction of the decay steps (instead of --lr-warmup-iters).",
    )
    weight_decay: float = flag_field(
        0.01, flag="--weight-decay", group="regularization", help="AdamW weight decay."
    )
    adam_beta1: float = flag_field(
        0.9, flag="--adam-beta1", group="regularization", help="AdamW beta1."
    )
    adam_beta2: float = flag_field(
        0.999, flag="--adam-beta2", group="regularization", help="AdamW beta2."
    )
    adam_eps: float = flag_field(
        1e-8, flag="--adam-eps", group="regularization", help="AdamW epsilon."
    )
    clip_grad: float = flag_field(
        1.0, flag="--clip-grad", group="regularization", help="Gradient norm clipping (0: off)."
    )
    seed: int = flag_field(1234, flag="--seed", group="training", help="Random seed.")
    bf16: bool = flag_field(
        False,
        flag="--bf16",
        group="mixed precision",
        action="store_true",
        help="bfloat16 training (GPU): megatron-core's mixed precision, fp32 main weights.",
    )
    use_distributed_optimizer: bool = flag_field(
        False,
        flag="--use-distributed-optimizer",
        group="parallelism",
        action="store_true",
        help="Shard optimizer state over data-parallel ranks.",
    )
    overlap_grad_reduce: bool = flag_field(
        False,
        flag="--overlap-grad-reduce",
        group="parallelism",
        action="store_true",
        help="Overlap gradient reduction with backward.",
    )
    overlap_param_gather: bool = flag_field(
        False,
        flag="--overlap-param-gather",
        group="parallelism",
        action="store_true",
        help="Overlap parameter all-gather with forward.",
    )
    max_skipped_steps: int = flag_field(
        10,
        flag="--max-skipped-steps",
        group="training",
        type=positive_int,
        help="A step with NaN/Inf loss or gradients is skipped; this many in a row stop the run.",
    )
    exit_interval: Optional[int] = flag_field(
        None,
        flag="--exit-interval",
        group="training",
        type=int,
        help="Stop when the step is a multiple of this.",
    )
    exit_duration_in_mins: Optional[int] = flag_field(
        None,
        flag="--exit-duration-in-mins",
        group="training",
        type=int,
        help="Stop after this many minutes (all ranks at the same step).",
    )
    exit_signal_handler: bool = flag_field(
        False,
        flag="--exit-signal-handler",
        group="training",
        action="store_true",
        help="On SIGTERM or SIGINT (Ctrl-C), finish the step, save a checkpoint and exit 0; all "
        "ranks stop at the same iteration.",
    )
    manual_gc: bool = flag_field(
        False,
        flag="--manual-gc",
        group="training",
        action="store_true",
        help="Python's garbage collector off, collecting at fixed steps instead "
        "(--manual-gc-interval, and around evaluations), so that its pauses line up across "
        "ranks.",
    )
    manual_gc_interval: int = flag_field(
        0,
        flag="--manual-gc-interval",
        group="training",
        type=nonnegative_int,
        help="With --manual-gc: collect every this many steps (0: only around evaluations).",
    )
    manual_gc_eval: bool = flag_field(
        True,
        flag="--no-manual-gc-eval",
        group="training",
        action="store_false",
        dest="manual_gc_eval",
        help="With --manual-gc: no collection around evaluations.",
    )
    distributed_timeout_minutes: int = flag_field(
        10, flag="--distributed-timeout-minutes", group="distributed", help="Collective timeout."
    )

    def validate(self) -> "TrainingConfig":
        checks = [
            (self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1"),
            (self.train_iters >= 0, "train_iters", "must be >= 0"),
            (
                self.lr_decay_style != "WSD" or self.lr_wsd_decay_iters is not None,
                "lr_wsd_decay_iters",
                "--lr-decay-style WSD needs --lr-wsd-decay-iters (the anneal's length)",
            ),
            (
                self.lr_wsd_decay_iters is None
                or 0 < self.lr_wsd_decay_iters <= (self.lr_decay_iters or self.train_iters),
                "lr_wsd_decay_iters",
                f"{self.lr_wsd_decay_iters} must be between 1 and the decay's "
                f"{self.lr_decay_iters or self.train_iters} iterations",
            ),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ConfigError(f"TrainingConfig.{name}: {message}")
        # Sentences about the fields, which the command line words in flag terms
        # (argument_mapping.in_flag_terms): "--overlap-param-gather needs ...".
        sentences = [
            (
                self.global_batch_size is None
                or self.global_batch_size % self.micro_batch_size == 0,
                f"global_batch_size={self.global_batch_size} is not divisible by "
                f"micro_batch_size={self.micro_batch_size}",
            ),
            (
                self.lr_warmup_fraction is None or self.lr_warmup_iters == 0,
                "lr_warmup_fraction and lr_warmup_iters are mutually exclusive; give one",
            ),
            (
                not self.overlap_param_gather or self.use_distributed_optimizer,
                "overlap_param_gather needs use_distributed_optimizer",
            ),
            (
                not self.overlap_param_gather or self.overlap_grad_reduce,
                "overlap_param_gather needs overlap_grad_reduce (as in Megatron-LM)",
            ),
        ]
        _refuse_first("TrainingConfig", sentences)
        return self


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from: Megatron indexed datasets (or mock data) and the tokenizer."""

    data_path: Optional[tuple] = flag_field(
        None,
        flag="--data-path",
        group="data",
        nargs="*",
        help="Dataset prefixes: one prefix, several prefixes, or a blend of 'weight prefix' "
        "pairs; one blend for all splits.",
    )
    split: Optional[str] = flag_field(
        None,
        flag="--split",
        group="data",
        type=str,
        help="Train,valid,test weights of --data-path's documents; default 969, 30, 1.",
    )
    train_data_path: Optional[tuple] = flag_field(
        None,
        flag="--train-data-path",
        group="data",
        nargs="*",
        help="Training blend (instead of --data-path).",
    )
    valid_data_path: Optional[tuple] = flag_field(
        None, flag="--valid-data-path", group="data", nargs="*", help="Validation blend."
    )
    test_data_path: Optional[tuple] = flag_field(
        None, flag="--test-data-path", group="data", nargs="*", help="Test blend."
    )
    mock_data: bool = flag_field(
        False,
        flag="--mock-data",
        group="data",
        action="store_true",
        help="Synthetic data instead of files.",
    )
    data_cache_path: Optional[str] = flag_field(
        None,
        flag="--data-cache-path",
        group="data",
        type=str,
        help="Where dataset index caches are written; default beside the data.",
    )
    demo_corpus: bool = flag_field(
        False,
        flag="--demo-corpus",
        group="data",
        action="store_true",
        help="Ours: train on the embedded demo corpus (built and cached on first use); it sets "
        "the data path and the GPT-2 BPE tokenizer files.",
    )
    tokenizer_type: Optional[str] = flag_field(
        None,
        flag="--tokenizer-type",
        group="tokenizer",
        choices=TOKENIZER_TYPES,
        help="Default GPT2BPETokenizer when --vocab-file and --merge-file are given.",
    )
    vocab_file: Optional[str] = flag_field(
        None,
        flag="--vocab-file",
        group="tokenizer",
        type=str,
        needs=("--tokenizer-type", "GPT2BPETokenizer"),
        note=UNUSED_BY_TOKENIZER,
        help="GPT-2 vocab.json.",
    )
    merge_file: Optional[str] = flag_field(
        None,
        flag="--merge-file",
        group="tokenizer",
        type=str,
        needs=("--tokenizer-type", "GPT2BPETokenizer"),
        note=UNUSED_BY_TOKENIZER,
        help="GPT-2 merges.txt.",
    )
    tokenizer_model: Optional[str] = flag_field(
        None,
        flag="--tokenizer-model",
        group="tokenizer",
        type=str,
        needs=("--tokenizer-type", lambda kind: kind != "GPT2BPETokenizer"),
        note=UNUSED_BY_TOKENIZER,
        help="SentencePiece .model, or a tokenizer.json (or its directory).",
    )
    make_vocab_size_divisible_by: int = flag_field(
        128,
        flag="--make-vocab-size-divisible-by",
        group="model architecture",
        help="Pad the vocabulary to a multiple of this times TP.",
    )

    def validate(self) -> "DataConfig":
        per_split = (self.train_data_path, self.valid_data_path, self.test_data_path)
        no_per_split = all(path is None for path in per_split)
        model_file_types = ("SentencePieceTokenizer", "HuggingFaceTokenizer")
        sentences = [
            (
                self.data_path is None or no_per_split,
                "data_path excludes train_data_path/valid_data_path/test_data_path",
            ),
            (
                not self.mock_data or self.data_path is None and no_per_split,
                "mock_data excludes data_path and the per-split data paths",
            ),
            (
                self.tokenizer_type != "GPT2BPETokenizer" or self.vocab_file and self.merge_file,
                "tokenizer_type=GPT2BPETokenizer needs vocab_file and merge_file",
            ),
            (
                self.tokenizer_type not in model_file_types or self.tokenizer_model,
                f"tokenizer_type={self.tokenizer_type} needs tokenizer_model",
            ),
            (
                self.tokenizer_type is not None or not self.tokenizer_model,
                f"tokenizer_model needs tokenizer_type={' or '.join(model_file_types)}",
            ),
        ]
        for name in BLEND_FIELDS:
            blend = getattr(self, name)
            problem = blend is not None and blend_problem(blend)
            sentences.append((not problem, f"{name} {problem}"))
        _refuse_first("DataConfig", sentences)
        return self

    def blends(self) -> list:
        """The blends that must exist on disk (none for mock data)."""
        if self.mock_data:
            return []
        if self.data_path is not None:
            return [self.data_path]
        blends = [b for b in (self.train_data_path, self.valid_data_path, self.test_data_path) if b]
        if not blends:
            raise ConfigError("no training data: give --data-path (or --mock-data, --demo-corpus)")
        return blends


@dataclass(frozen=True)
class CheckpointConfig:
    """Where checkpoints go and what a resume takes from them."""

    save: Optional[str] = flag_field(
        None, flag="--save", group="checkpointing", type=str, help="Checkpoint directory to write."
    )
    load: Optional[str] = flag_field(
        None,
        flag="--load",
        group="checkpointing",
        type=str,
        help="Checkpoint directory to resume from (empty: start fresh).",
    )
    save_interval: Optional[int] = flag_field(
        None,
        flag="--save-interval",
        group="checkpointing",
        type=int,
        help="Steps between checkpoints.",
    )
    finetune: bool = flag_field(
        False,
        flag="--finetune",
        group="checkpointing",
        action="store_true",
        help="Load only the weights and start at step 0 (no optimizer/RNG state): a new run.",
    )
    no_load_optim: bool = flag_field(
        False,
        flag="--no-load-optim",
        group="checkpointing",
        action="store_true",
        parser_default=None,
        help="Load no optimizer state.",
    )
    no_load_rng: bool = flag_field(
        False,
        flag="--no-load-rng",
        group="checkpointing",
        action="store_true",
        parser_default=None,
        help="Load no RNG state.",
    )
    no_save_optim: bool = flag_field(
        False,
        flag="--no-save-optim",
        group="checkpointing",
        action="store_true",
        parser_default=None,
        help="Save no optimizer state.",
    )
    async_save: bool = flag_field(
        False,
        flag="--async-save",
        group="checkpointing",
        action="store_true",
        needs=("--use-persistent-ckpt-worker",),
        note="needs --use-persistent-ckpt-worker, as in Megatron-LM; checkpoints are written "
        "synchronously",
        help="Write checkpoints in the background while training goes on (megatron-core's "
        "async torch_dist save; with --use-persistent-ckpt-worker, as in Megatron-LM).",
    )
    use_persistent_ckpt_worker: bool = flag_field(
        False,
        flag="--use-persistent-ckpt-worker",
        group="checkpointing",
        action="store_true",
        needs=("--async-save",),
        note="only used with --async-save",
        help="--async-save's writer is one process kept for the whole run (else one per save).",
    )
    ckpt_fully_parallel_save: bool = flag_field(
        True,
        flag="--no-ckpt-fully-parallel-save",
        group="checkpointing",
        action="store_false",
        dest="ckpt_fully_parallel_save",
        help="Replicated tensors written by data-parallel rank 0 alone instead of spread over "
        "all data-parallel ranks (megatron-core's FullyParallelSaveStrategyWrapper).",
    )
    ckpt_fully_parallel_load: bool = flag_field(
        False,
        flag="--ckpt-fully-parallel-load",
        group="checkpointing",
        action="store_true",
        help="Each data-parallel rank reads a part of the replicated tensors and they are "
        "exchanged (megatron-core's FullyParallelLoadStrategyWrapper).",
    )
    dist_ckpt_optim_fully_reshardable: bool = flag_field(
        False,
        flag="--dist-ckpt-optim-fully-reshardable",
        group="checkpointing",
        action="store_true",
        help="Save the distributed optimizer's state by parameter, so that it resumes under "
        "other TP/PP/EP sizes too (else only under another data-parallel size).",
    )


@dataclass(frozen=True)
class LoggingConfig:
    """The log line, tensorboard and evaluation."""

    log_interval: int = flag_field(
        100, flag="--log-interval", group="logging", help="Steps between log lines."
    )
    tensorboard_dir: Optional[str] = flag_field(
        None,
        flag="--tensorboard-dir",
        group="logging",
        type=str,
        help="Write TensorBoard events here.",
    )
    wandb_project: str = flag_field(
        "",
        flag="--wandb-project",
        group="logging",
        type=str,
        help="Log to this Weights & Biases project too (pip install 'remoe[wandb]'); "
        "WANDB_MODE=offline writes the run for a later wandb sync.",
    )
    wandb_exp_name: str = flag_field(
        "",
        flag="--wandb-exp-name",
        group="logging",
        type=str,
        help="The W&B run's name (needed with --wandb-project).",
    )
    wandb_save_dir: str = flag_field(
        "",
        flag="--wandb-save-dir",
        group="logging",
        type=str,
        help="Where W&B writes the run; default <save>/wandb.",
    )
    wandb_entity: str = flag_field(
        "",
        flag="--wandb-entity",
        group="logging",
        type=str,
        help="The W&B team or user; default W&B's own.",
    )
    moe_per_layer_logging: bool = flag_field(
        False,
        flag="--moe-per-layer-logging",
        group="logging",
        action="store_true",
        help="Also write each MoE layer's routing statistics (expert shares, sparsity, aux "
        "losses) to TensorBoard and W&B as <key>/layer_N; metrics.jsonl always holds them.",
    )
    timing_log_level: int = flag_field(
        0,
        flag="--timing-log-level",
        group="logging",
        type=int,
        choices=(0, 1, 2),
        help="Timers in the log: 0 none, 1 forward-backward, optimizer and gradient "
        "reductions, 2 also compute, communication and the MoE layers' router, dispatch, "
        "experts and combine (slower: each timer synchronizes the device).",
    )
    timing_log_option: str = flag_field(
        "minmax",
        flag="--timing-log-option",
        group="logging",
        type=str,
        choices=("max", "minmax", "all"),
        help="The console's timers over ranks: the max, the min and max, or every rank.",
    )
    log_timers_to_tensorboard: bool = flag_field(
        False,
        flag="--log-timers-to-tensorboard",
        group="logging",
        action="store_true",
        needs=("--tensorboard-dir",),
        help="Also write the timers (max over ranks) to TensorBoard and W&B as <name>-time.",
    )
    log_memory_to_tensorboard: bool = flag_field(
        False,
        flag="--log-memory-to-tensorboard",
        group="logging",
        action="store_true",
        needs=("--tensorboard-dir",),
        help="Also write the memory of each log window to TensorBoard and W&B.",
    )
    eval_interval: Optional[int] = flag_field(
        1000,
        flag="--eval-interval",
        group="validation",
        help="Steps between evaluations (0: none).",
    )
    eval_iters: int = flag_field(
        100,
        flag="--eval-iters",
        group="validation",
        help="Global batches per evaluation (the same ones every time).",
    )
    full_validation: bool = flag_field(
        False,
        flag="--full-validation",
        group="validation",
        action="store_true",
        help="Score the whole validation split at each evaluation (and the whole test split at "
        "the end) instead of --eval-iters batches.",
    )
    skip_train: bool = flag_field(
        False,
        flag="--skip-train",
        group="validation",
        action="store_true",
        help="Train nothing: evaluate the weights (of --load) on the validation and test splits, "
        "print the losses and exit; nothing is saved.",
    )
    eval_domains: Optional[str] = flag_field(
        None,
        flag="--eval-domains",
        group="validation",
        type=str,
        help="Ours: the validation and test losses per domain as well, from this list of one "
        "domain per document of the data prefix (a JSON list, or the jsonl corpus with "
        "--eval-domain-key); the demo corpus uses its own.",
    )
    eval_domain_key: Optional[str] = flag_field(
        None,
        flag="--eval-domain-key",
        group="validation",
        type=str,
        help="Ours: where a jsonl --eval-domains holds the domain, dotted for nested keys "
        "(default 'domain'; The Pile: meta.pile_set_name).",
    )
    profile: bool = flag_field(
        False,
        flag="--profile",
        group="profiling",
        action="store_true",
        help="Profile steps --profile-step-start+1 .. --profile-step-end on --profile-ranks: "
        "with --use-pytorch-profiler a torch profiler trace, else CUDA's profiler range for "
        "nsys --capture-range=cudaProfilerApi.",
    )
    profile_step_start: int = flag_field(
        10,
        flag="--profile-step-start",
        group="profiling",
        type=nonnegative_int,
        help="Global iteration the profile starts at.",
    )
    profile_step_end: int = flag_field(
        12,
        flag="--profile-step-end",
        group="profiling",
        type=nonnegative_int,
        help="Global iteration the profile ends at.",
    )
    profile_ranks: tuple = flag_field(
        (0,),
        flag="--profile-ranks",
        group="profiling",
        type=nonnegative_int,
        nargs="+",
        parser_default=[0],
        help="Global ranks to profile.",
    )
    use_pytorch_profiler: bool = flag_field(
        False,
        flag="--use-pytorch-profiler",
        group="profiling",
        action="store_true",
        help="torch's profiler: a trace per rank in --tensorboard-dir (else <save>/profile) "
        "for TensorBoard or Perfetto.",
    )
    record_memory_history: bool = flag_field(
        False,
        flag="--record-memory-history",
        group="profiling",
        action="store_true",
        help="Record CUDA allocations and write the snapshot to --memory-snapshot-path at each "
        "log line (CUDA only).",
    )
    memory_snapshot_path: str = flag_field(
        "snapshot.pickle",
        flag="--memory-snapshot-path",
        group="profiling",
        type=str,
        help="Where --record-memory-history writes (pytorch.org/memory_viz opens it).",
    )

    def validate(self) -> "LoggingConfig":
        ok = not self.profile or self.profile_step_end > self.profile_step_start
        _refuse_first(
            "LoggingConfig",
            [
                (
                    ok,
                    f"profile_step_end={self.profile_step_end} must be after "
                    f"profile_step_start={self.profile_step_start}",
                )
            ],
        )
        return self


@dataclass(frozen=True)
class OtherFlags:
    """Megatron-LM's flags that set no field of their own: values the mapping derives fields from
    (``argument_mapping``), and flags without effect here (``note``). Never instantiated."""

    group_query_attention: bool = flag_field(
        False,
        flag="--group-query-attention",
        group=ARCH,
        action="store_true",
        help="Grouped-query attention.",
    )
    max_position_embeddings: Optional[int] = flag_field(
        None,
        flag="--max-position-embeddings",
        group=ARCH,
        type=int,
        help="Longest sequence (default --seq-length); must be >= --seq-length.",
    )
    use_mcore_models: bool = flag_field(
        False,
        flag="--use-mcore-models",
        group=ARCH,
        action="store_true",
        note="always on: megatron-core models are the only ones",
        help="No-op: megatron-core models always.",
    )
    moe_ffn_hidden_size: Optional[int] = flag_field(
        None,
        flag="--moe-ffn-hidden-size",
        group=MOE_GROUP,
        type=int,
        help="Expert width before granularity; default the FFN width.",
    )
    moe_layer_recompute: bool = flag_field(
        False,
        flag="--moe-layer-recompute",
        group=MOE_GROUP,
        action="store_true",
        needs=("--recompute-granularity", lambda granularity: granularity != "full"),
        note="full recomputation already recomputes every layer",
        help="Recompute the MoE layers in the backward pass (saves memory).",
    )
    moe_relu_routing: bool = flag_field(
        False,
        flag="--moe-relu-routing",
        group=MOE_GROUP,
        action="store_true",
        help="ReMoE: ReLU routing (the same as --moe-router-type relu).",
    )
    num_workers: int = flag_field(
        2,
        flag="--num-workers",
        group="data",
        note="batches are read in the training process",
        help="Data loader worker processes.",
    )
    train_samples: Optional[int] = flag_field(
        None,
        flag="--train-samples",
        group="training",
        type=int,
        help="Training sequences (or --train-iters).",
    )
    optimizer: str = flag_field(
        "adam",
        flag="--optimizer",
        group="training",
        choices=["adam"],
        help="adam is AdamW, as in Megatron-LM.",
    )
    recompute_activations: bool = flag_field(
        False,
        flag="--recompute-activations",
        group=RECOMPUTE,
        action="store_true",
        help="Selective recomputation (core attention).",
    )
    use_flash_attn: bool = flag_field(
        False,
        flag="--use-flash-attn",
        group=FUSED,
        action="store_true",
        speed_only=True,
        help="Flash attention.",
    )
    log_throughput: bool = flag_field(
        False,
        flag="--log-throughput",
        group="logging",
        action="store_true",
        note="always on: throughput is always logged",
        help="No-op: always logged.",
    )
    tensorboard_log_interval: int = flag_field(
        1,
        flag="--tensorboard-log-interval",
        group="logging",
        note="tensorboard is written at every --log-interval",
        help="Steps between TensorBoard writes.",
    )
    use_checkpoint_args: bool = flag_field(
        False,
        flag="--use-checkpoint-args",
        group="checkpointing",
        action="store_true",
        help="Take the model flags from --load.",
    )
    ckpt_format: str = flag_field(
        "torch_dist",
        flag="--ckpt-format",
        group="checkpointing",
        choices=["torch_dist"],
        help="Checkpoint format.",
    )
    dist_ckpt_strictness: str = flag_field(
        "assume_ok_unexpected",
        flag="--dist-ckpt-strictness",
        group="checkpointing",
        choices=[
            "assume_ok_unexpected",
            "log_unexpected",
            "log_all",
            "raise_unexpected",
            "raise_all",
            "return_unexpected",
            "return_all",
            "ignore_all",
        ],
        note="checkpoints always load strictly (every saved tensor must fit the model)",
        help="How loading treats missing or unexpected checkpoint keys.",
    )
    distributed_backend: str = flag_field(
        "nccl",
        flag="--distributed-backend",
        group="distributed",
        choices=["nccl", "gloo"],
        help="Follows the device: NCCL on GPUs, gloo on CPU.",
    )


PARTS = dict(
    model=ModelConfig,
    parallel=ParallelConfig,
    layers=LayerOptions,
    training=TrainingConfig,
    data=DataConfig,
    checkpoint=CheckpointConfig,
    logging=LoggingConfig,
)


@dataclass(frozen=True)
class RunConfig:
    """One training run (see the module docstring)."""

    model: ModelConfig
    parallel: ParallelConfig
    training: TrainingConfig
    layers: LayerOptions = field(default_factory=LayerOptions)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> "RunConfig":
        self.model.validate()
        self.parallel.validate_for(self.model)
        self.layers.validate()
        self.training.validate()
        self.data.validate()
        self.logging.validate()
        self._validate_router()
        return self

    def _validate_router(self) -> None:
        """The rules between the router's kind and the other parts' settings."""
        model, layers = self.model, self.layers
        kind = ROUTERS[model.router]
        pipeline = self.parallel.pipeline_model_parallel_size
        recomputes_moe = layers.recompute_granularity == "full" or "moe" in layers.recompute_modules
        topk_router = layers.topk_router
        softmax = topk_router.get("moe_router_score_function", "softmax") == "softmax"
        rules = [
            (
                # The routers hold the ids of the last forward; under 1F1B a recomputed forward
                # of micro-batch i runs after micro-batch i+1's forward (hash_router.py).
                # moe_layer_recompute: "moe" in LayerOptions.recompute_modules.
                not (kind.routes_by_token_ids and pipeline > 1 and recomputes_moe),
                f"ModelConfig.router={kind.name} with recomputation at "
                f"pipeline_model_parallel_size={pipeline} would route recomputed layers with "
                "another micro-batch's token ids; drop moe_layer_recompute/"
                "recompute_granularity=full or use PP=1",
            ),
            (
                # megatron-core 0.16.1's alltoall dispatcher sizes the fused permutation's output
                # as tokens x k in the dropless case; these routers give a token up to E experts,
                # and transformer-engine's kernel would write past that buffer.
                not (kind.experts_per_token_vary and layers.moe_permute_fusion),
                f"ModelConfig.router={kind.name} excludes moe_permute_fusion: the fused "
                f"permutation's buffer holds tokens x topk={model.topk} entries, and "
                f"{kind.title} routing activates up to num_experts={model.num_experts} per "
                "token; drop moe_permute_fusion",
            ),
            (
                not (
                    kind.token_dropping
                    and topk_router.get("moe_pad_expert_input_to_capacity")
                    and model.moe_expert_capacity_factor is None
                ),
                "LayerOptions.moe_pad_expert_input_to_capacity needs moe_expert_capacity_factor",
            ),
            (
                # The command line refuses sinkhorn balancing for megatron's TopKRouter (it is
                # built with the Switch aux loss or none), the one case megatron-core allows.
                not (
                    kind.megatron_topk_router
                    and model.topk * model.granularity == 1
                    and softmax
                    # absent: ModelConfig.transformer_config's default, pre-softmax on
                    and not topk_router.get("moe_router_pre_softmax", True)
                ),
                f"ModelConfig.topk={model.topk} needs moe_router_pre_softmax (a softmax over "
                "the one chosen expert has no gradient; megatron-core refuses it)",
            ),
        ]
        for ok, sentence in rules:  # sentences about fields, each naming its part
            if not ok:
                raise ConfigError(sentence)

    def replace(self, **parts) -> "RunConfig":
        """A new config with some parts replaced; a part given as a dict updates its fields."""
        new = {
            name: dataclasses.replace(getattr(self, name), **value)
            if isinstance(value, dict)
            else value
            for name, value in parts.items()
        }
        return dataclasses.replace(self, **new)

    def to_dict(self) -> dict:
        """Plain data (for checkpoints, YAML or JSON)."""
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in PARTS}

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """The config ``to_dict`` wrote; unknown fields are an error naming them."""
        parts = {}
        for name, part in PARTS.items():
            values = dict(data.get(name) or {})
            if name == "model":
                values = _model_values(values)
            known = {f.name: f for f in dataclasses.fields(part)}
            unknown = sorted(set(values) - set(known))
            if unknown:
                raise ConfigError(
                    f"RunConfig.{name}: unknown fields {unknown} (a newer run's config?)"
                )
            for key, value in values.items():
                if isinstance(value, list):  # tuples come back from YAML/JSON as lists
                    values[key] = tuple(value)
            parts[name] = part(**values)
        return cls(**parts)


BLEND_FIELDS = ("data_path", "train_data_path", "valid_data_path", "test_data_path")


def split_blend(tokens) -> tuple:
    """Megatron-LM's blend: ``(prefixes, weights)``; weights is None for bare prefixes.

    An even number of tokens whose even positions are all numbers is a ``weight prefix`` list;
    otherwise every token is a prefix. ValueError for a blend that ``blend_problem`` refuses.
    """
    tokens = list(tokens)
    problem = blend_problem(tokens)
    if problem:
        raise ValueError(problem)
    weights = _weights_or_nones(tokens)
    return (tokens, None) if None in weights else (tokens[1::2], weights)


def blend_problem(tokens) -> Optional[str]:
    """What is wrong with a blend, worded after its field name: no prefix, or numbers at only
    some even positions (megatron's ``get_blend_from_list`` would take them for prefixes)."""
    tokens = list(tokens)
    weights = _weights_or_nones(tokens)
    if not tokens:
        return "gives no dataset prefix"
    if None in weights and any(weight is not None for weight in weights):
        return "mixes 'weight prefix' pairs with bare prefixes"
    return None


def _weights_or_nones(tokens: list) -> list:
    """The blend's even-position tokens as numbers (None for a non-number; [None] when odd)."""
    if len(tokens) % 2:
        return [None]
    weights = []
    for token in tokens[0::2]:
        try:
            weights.append(float(token))
        except ValueError:
            weights.append(None)
    return weights


def _refuse_first(part: str, rules) -> None:
    """ConfigError on the first of ``rules``, ``(ok, a sentence about a field of part)``, not
    ok; the command line words it in flag terms (argument_mapping.in_flag_terms)."""
    for ok, sentence in rules:
        if not ok:
            raise ConfigError(f"{part}.{sentence}")


def _model_values(values: dict) -> dict:
    """ModelConfig's keyword arguments from its saved fields, its router's options rebuilt (also
    from a run saved with the flat router fields of older versions)."""
    router = values.get("router", "relu")
    kind = ROUTERS.get(router)
    if kind is None:
        raise ConfigError(f"RunConfig.model.router: {router!r} is not one of {', '.join(ROUTERS)}")
    # A run saved with the flat router fields holds them all, whatever its router.
    flat = {old for other in ROUTERS.values() for old in other.legacy_flat_fields}
    saved_flat = {key: values.pop(key) for key in list(values) if key in flat}
    options = values.get("router_options")
    if options is None:
        options = {
            new: saved_flat[old]
            for old, new in kind.legacy_flat_fields.items()
            if old in saved_flat
        }
        if saved_flat:
            options = {**kind.legacy_defaults, **options}
    if isinstance(options, dict):
        known = {f.name for f in dataclasses.fields(kind.options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"RunConfig.model.router_options: unknown fields {unknown} for "
                f"{router} routing (a newer run's config?)"
            )
        options = kind.options(**options)
    return {**values, "router_options": options}


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
