"""``RunConfig``: everything one training run is, as typed, documented, plain data.

``pretrain_gpt.py`` builds it once from Megatron-LM-style flags and YAML
(``arguments.parse_run_config``); training, evaluation, export, analysis and the benchmark take
it, and every checkpoint stores it (``to_dict``: nested dicts of numbers, strings, lists and
None, never pickled objects), so a checkpoint is rebuilt from what it says (``from_dict``).

Parts: ``model`` (``config.ModelConfig``: the architecture and routing), ``parallel``
(``config.ParallelConfig``: the layout), ``layers`` (TransformerConfig options that do not change
the model's function: recomputation, fused kernels, TopK-router extras), ``training`` (batches,
steps, optimizer, schedule, precision, when to stop), ``data`` (datasets and tokenizer),
``checkpoint`` and ``logging``. Each part is frozen: a change is a new config
(``dataclasses.replace``), so nothing is mutated mid-run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from remoe_patches.config import ConfigError, ModelConfig, ParallelConfig
from remoe_patches.router_registry import ROUTERS


@dataclass(frozen=True)
class LayerOptions:
    """TransformerConfig settings beyond ``ModelConfig``: how the layers compute, not what."""

    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    kv_channels: Optional[int] = None
    """Width of one attention head; default hidden / heads."""
    recompute_granularity: Optional[str] = None
    """None, 'selective' (the modules below) or 'full' (whole layers)."""
    recompute_method: Optional[str] = None
    """'uniform' or 'block' (full recomputation only)."""
    recompute_num_layers: Optional[int] = None
    """Layers per recomputed unit (full recomputation only)."""
    recompute_modules: tuple = ()
    """Selective recomputation's modules: 'core_attn', 'moe'."""
    masked_softmax_fusion: bool = True
    bias_swiglu_fusion: bool = True
    bias_dropout_fusion: bool = True
    gradient_accumulation_fusion: bool = True
    moe_permute_fusion: bool = False
    """The fusions wanted; each is on only where its kernel exists (see ``transformer_overrides``)."""
    transformer_impl: str = "transformer_engine"
    """'transformer_engine' (when installed) or 'local' (megatron-core's own layers). A run saves
    the implementation it used (``model.transformer_impl_in_use``), not the one asked for."""
    topk_router: dict = field(default_factory=dict)
    """TopK-only TransformerConfig options (pre-softmax, scaling factor, score function, expert
    bias, jitter, token-drop policy, z-loss, capacity padding); empty for dense and ReLU models."""

    def transformer_overrides(self, *, is_moe: bool, cuda_available: bool,
                              transformer_engine_available: bool,
                              wgrad_fusion_available: bool = False) -> dict:
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
            gradient_accumulation_fusion=(self.gradient_accumulation_fusion and cuda_available
                                          and wgrad_fusion_available),
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
        return dataclasses.replace(self, recompute_granularity=None, recompute_method=None,
                                   recompute_num_layers=None, recompute_modules=())


@dataclass(frozen=True)
class TrainingConfig:
    """Batches, steps, optimizer (AdamW), LR schedule, precision and when to stop."""

    micro_batch_size: int
    """Sequences per micro-batch on one rank."""
    train_iters: int
    """Optimizer steps of the whole run (from ``--train-samples`` when given in samples)."""
    lr: float
    """Peak learning rate."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step; None: micro-batch x data-parallel size."""
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    """'constant', 'linear' or 'cosine' (Megatron-LM's schedules)."""
    lr_decay_iters: Optional[int] = None
    """Decay steps; None: ``train_iters``."""
    lr_warmup_iters: int = 0
    lr_warmup_fraction: Optional[float] = None
    """Warm-up as a fraction of the decay (replaces ``lr_warmup_iters``)."""
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clipping (0: off)."""
    seed: int = 1234
    bf16: bool = False
    """megatron-core's bf16 mixed precision (Float16Module, fp32 main weights)."""
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    max_skipped_steps: int = 10
    """Stop after more steps than this in a row had a non-finite loss or gradient."""
    exit_interval: Optional[int] = None
    """Stop at an iteration that is a multiple of this."""
    exit_duration_in_mins: Optional[int] = None
    """Stop after this many minutes (all ranks at the same step)."""
    exit_signal_handler: bool = False
    """Stop after the step during which SIGTERM or SIGINT arrived, saving a checkpoint."""
    distributed_timeout_minutes: int = 10

    def validate(self) -> "TrainingConfig":
        checks = [
            (self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1"),
            (self.train_iters >= 0, "train_iters", "must be >= 0"),
            (self.global_batch_size is None or self.global_batch_size % self.micro_batch_size == 0,
             "global_batch_size",
             f"{self.global_batch_size} is not divisible by micro_batch_size "
             f"{self.micro_batch_size}"),
            (not self.overlap_param_gather or self.use_distributed_optimizer,
             "overlap_param_gather", "needs use_distributed_optimizer"),
            (not self.overlap_param_gather or self.overlap_grad_reduce,
             "overlap_param_gather", "needs overlap_grad_reduce (as in Megatron-LM)"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ConfigError(f"TrainingConfig.{name}: {message}")
        return self


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from: Megatron indexed datasets (or mock data) and the tokenizer."""

    data_path: Optional[tuple] = None
    """One blend for all splits: prefixes, or 'weight prefix' pairs."""
    split: Optional[str] = None
    """Train/valid/test shares of ``data_path``'s documents, e.g. '969,30,1'."""
    train_data_path: Optional[tuple] = None
    valid_data_path: Optional[tuple] = None
    test_data_path: Optional[tuple] = None
    mock_data: bool = False
    """Synthetic tokens (no files)."""
    data_cache_path: Optional[str] = None
    """Where megatron's dataset index caches go; default beside the data."""
    demo_corpus: bool = False
    """The embedded demo corpus; the launcher fills in its paths and tokenizer."""
    tokenizer_type: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    tokenizer_model: Optional[str] = None
    make_vocab_size_divisible_by: int = 128
    """The model's vocabulary is the tokenizer's, padded to a multiple of this x TP."""

    def blends(self) -> list:
        """The blends that must exist on disk (none for mock data)."""
        if self.mock_data:
            return []
        if self.data_path is not None:
            return [self.data_path]
        blends = [b for b in (self.train_data_path, self.valid_data_path, self.test_data_path)
                  if b]
        if not blends:
            raise ConfigError(
                "no training data: give --data-path (or --mock-data, --demo-corpus)")
        return blends


@dataclass(frozen=True)
class CheckpointConfig:
    """Where checkpoints go and what a resume takes from them."""

    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    finetune: bool = False
    """Take only the weights of ``load`` and start a new run (iteration 0)."""
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    """The log line, tensorboard and evaluation."""

    log_interval: int = 100
    tensorboard_dir: Optional[str] = None
    eval_interval: Optional[int] = 1000
    """Steps between validation runs (0 or None: none)."""
    eval_iters: int = 100
    """Global batches per validation run (the same ones every time)."""
    full_validation: bool = False
    """Score the whole validation split (and, at the end, the whole test split) instead of
    ``eval_iters`` batches."""
    skip_train: bool = False
    """Train nothing: evaluate the loaded weights on the validation and test splits and stop;
    nothing is saved."""


PARTS = dict(model=ModelConfig, parallel=ParallelConfig, layers=LayerOptions,
             training=TrainingConfig, data=DataConfig, checkpoint=CheckpointConfig,
             logging=LoggingConfig)


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
        self.training.validate()
        return self

    def replace(self, **parts) -> "RunConfig":
        """A new config with some parts replaced; a part given as a dict updates its fields."""
        new = {name: dataclasses.replace(getattr(self, name), **value)
               if isinstance(value, dict) else value for name, value in parts.items()}
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
                raise ConfigError(f"RunConfig.{name}: unknown fields {unknown} (a newer run's "
                                  "config?)")
            for key, value in values.items():
                if isinstance(value, list):  # tuples come back from YAML/JSON as lists
                    values[key] = tuple(value)
            parts[name] = part(**values)
        return cls(**parts)


# ModelConfig's flat router fields before the router registry: the field of the router's options
# each became. A run saved then holds them all, whatever its router.
_FLAT_ROUTER_FIELDS = {
    "relu": dict(relu_l1_coeff_init="l1_coeff_init", relu_l1_coeff_multiplier="l1_coeff_multiplier",
                 relu_load_balancing="load_balancing"),
    "hash": dict(hash_type="hash_type", hash_seed="seed"),
    "expert_choice": dict(expert_choice_capacity_factor="capacity_factor",
                          expert_choice_group="group"),
    "sparsemixer": dict(sparsemixer_jitter_eps="jitter_eps"),
    "lory": dict(lory_segment_length="segment_length",
                 lory_dense_warmup_fraction="dense_warmup_fraction",
                 lory_first_segment="first_segment"),
}


def _model_values(values: dict) -> dict:
    """ModelConfig's keyword arguments from its saved fields, its router's options rebuilt (also
    from a run saved with the flat router fields of older versions)."""
    router = values.get("router", "relu")
    kind = ROUTERS.get(router)
    if kind is None:
        raise ConfigError(f"RunConfig.model.router: {router!r} is not one of {', '.join(ROUTERS)}")
    flat = {old: new for fields in _FLAT_ROUTER_FIELDS.values() for old, new in fields.items()}
    saved_flat = {key: values.pop(key) for key in list(values) if key in flat}
    options = values.get("router_options")
    if options is None:
        options = {new: saved_flat[old] for old, new in _FLAT_ROUTER_FIELDS.get(router, {}).items()
                   if old in saved_flat}
        if saved_flat and router == "hash" and "hash_type" not in options:
            # Saved before the hash type existed: hash runs then used the seeded random
            # permutation, and must be rebuilt with the map they were trained with.
            options["hash_type"] = "random_permutation"
        if saved_flat and router == "lory" and "dense_warmup_fraction" not in options:
            options["dense_warmup_fraction"] = 0.0  # trained before the warm-up existed
    if isinstance(options, dict):
        known = {f.name for f in dataclasses.fields(kind.options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"RunConfig.model.router_options: unknown fields {unknown} for "
                              f"{router} routing (a newer run's config?)")
        options = kind.options(**options)
    return {**values, "router_options": options}


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
