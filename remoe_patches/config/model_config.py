"""Typed configs for a model and its parallel layout, the paper's presets, and validation.

``ModelConfig`` describes one GPT model of the paper (spec §3): the LLaMA recipe is fixed, the
router is a choice from ``router_registry.ROUTERS`` (``dense``, ``topk``, ``relu`` = ReMoE, and
the Table 2 baselines), with its own options in ``router_options``. ``ParallelConfig`` holds the
layout.
``ModelConfig.transformer_config(parallel)`` turns both into megatron-core's TransformerConfig.
Every check fails with a ``ConfigError`` that names the config, the field and the fix.
The fields declare their ``pretrain_gpt.py`` flags (``flag_fields.flag_field``), and
``RecipeFlags`` and ``UnbuiltFlags`` Megatron-LM's flags that only one value of suits here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig

from remoe_patches.config.flag_fields import flag_field, int_or_list
from remoe_patches.config.router_registry import MOE_GROUP, ROUTERS, RouterKind

DROPLESS_DISPATCHERS = ("alltoall", "allgather", "sorted")

FP32_ROUTER_FROM_EXPERTS = 32
"""megatron-core advises fp32 routing from this many experts (it warns otherwise)."""


def default_router_dtype(total_experts: int) -> Optional[str]:
    """The router's dtype when none is asked for: fp32 from 32 experts (E x G), the model's dtype
    below, for every router alike (README, 'Router precision')."""
    return "fp32" if total_experts >= FP32_ROUTER_FROM_EXPERTS else None


ARCH = "model architecture"
"""The argparse group of the architecture's flags (Megatron-LM's)."""


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and the fix."""


# The paper's dense backbones (spec §3); names are the dense model sizes.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512, seq_length=64
    ),
    "182m": dict(num_layers=12, hidden_size=768, num_attention_heads=12),
    "469m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16),
    "978m": dict(num_layers=24, hidden_size=1536, num_attention_heads=16),
}


@dataclass(frozen=True)
class ModelConfig:
    """One GPT model: LLaMA architecture (spec §3) with a dense, TopK-MoE or ReLU-MoE MLP."""

    num_layers: int = flag_field(
        flag="--num-layers", group=ARCH, type=int, help="Transformer layers (required)."
    )
    """Transformer layers."""
    hidden_size: int = flag_field(
        flag="--hidden-size", group=ARCH, type=int, help="Model width (required)."
    )
    """Model width."""
    num_attention_heads: int = flag_field(
        flag="--num-attention-heads", group=ARCH, type=int, help="Query heads (required)."
    )
    """Query heads."""
    num_query_groups: int = flag_field(
        4,
        flag="--num-query-groups",
        group=ARCH,
        parser_default=1,
        needs=("--group-query-attention",),
        help="Key/value heads with --group-query-attention.",
    )
    """Key/value heads of grouped-query attention."""
    ffn_hidden_size: Optional[int] = flag_field(
        None,
        flag="--ffn-hidden-size",
        group=ARCH,
        type=int,
        help="FFN width; default 4 * hidden, also with --swiglu (the paper's FFN).",
    )
    """Width of the dense FFN and of each expert before granularity; default 4 * hidden_size."""
    vocab_size: int = 51200
    """Padded vocabulary size (the paper: GPT-2 BPE padded to a multiple of 1024, 51200)."""
    seq_length: int = flag_field(
        1024,
        flag="--seq-length",
        group="data",
        parser_default=None,
        type=int,
        help="Tokens per sequence (required).",
    )
    """Tokens per sequence (also the RoPE table length)."""
    rotary_base: int = flag_field(
        1_000_000, flag="--rotary-base", group=ARCH, parser_default=10000, help="RoPE base."
    )
    """RoPE base."""
    init_method_std: float = flag_field(
        0.01,
        flag="--init-method-std",
        group=ARCH,
        parser_default=0.02,
        help="Std of the normal init.",
    )
    """Std of the normal weight init."""

    # The MoE fields (their flags' group): a dense model keeps their defaults.
    router: str = flag_field(
        "relu",
        flag="--moe-router-type",
        group=MOE_GROUP,
        parser_default=None,
        choices=[kind.name for kind in ROUTERS.values() if kind.is_moe],
        help="The router: "
        + "; ".join(f"{kind.name}: {kind.summary}" for kind in ROUTERS.values() if kind.is_moe)
        + " (the baselines of the paper's Table 2: README 'Table 2 baselines').",
    )
    """A name of ``router_registry.ROUTERS``: ``dense`` (no experts), ``topk`` (megatron's
    TopKRouter), ``relu`` (ReMoE), or a Table 2 baseline (``hash``, ``expert_choice``,
    ``sparsemixer``, ``lory``)."""
    router_options: Any = None
    """The router's own options, an instance of its registry entry's ``options`` dataclass
    (``ReLUOptions``, ``HashOptions``, ...); None: that dataclass's defaults."""
    num_experts: int = flag_field(
        8,
        flag="--num-experts",
        group=MOE_GROUP,
        parser_default=None,
        type=int,
        help="Experts E; a dense model without it.",
    )
    """Experts E before granularity."""
    topk: int = flag_field(
        1,
        flag="--moe-router-topk",
        group=MOE_GROUP,
        parser_default=2,
        help="k active experts (TopK); with ReLU routing it sets the target sparsity 1 - k/E.",
    )
    """k: TopK's active experts; for ReLU routing it sets the target sparsity 1 - k/E."""
    granularity: int = flag_field(
        1,
        flag="--moe-granularity",
        group=MOE_GROUP,
        help="Fine-grained experts G: E*G experts of width FFN/G, k*G active.",
    )
    """G: fine-grained experts, E*G experts of width ffn/G with top-k*G."""
    moe_aux_loss_coeff: float = flag_field(
        0.01,
        flag="--moe-aux-loss-coeff",
        group=MOE_GROUP,
        parser_default=0.0,
        type=float,
        help="Weight of TopK's Switch aux loss.",
    )
    """Weight of the Switch load-balancing loss of the routers balanced by it (TopK,
    SparseMixer-v2; 0 turns it off); the other routers ignore it."""
    token_dispatcher: str = flag_field(
        "alltoall",
        flag="--moe-token-dispatcher-type",
        group=MOE_GROUP,
        parser_default="allgather",
        choices=["allgather", "alltoall", "alltoall_seq", "flex", "sorted"],
        help="Token dispatcher; alltoall or allgather (both dropless), or sorted: no "
        "communication, device-side expert offsets, one host read per layer (EP=TP=1).",
    )
    """The dropless token path: megatron's ``alltoall`` or ``allgather`` dispatcher, or ``sorted``
    (``token_dispatch.py``: all on the device, one host read per layer; EP = TP = 1 only)."""
    moe_expert_capacity_factor: Optional[float] = flag_field(
        None,
        flag="--moe-expert-capacity-factor",
        group=MOE_GROUP,
        type=float,
        help="TopK token dropping capacity; unset means dropless.",
    )
    """Token dropping capacity; must stay None (dropless) for ReLU routing."""
    moe_grouped_gemm: bool = flag_field(
        False,
        flag="--moe-grouped-gemm",
        group=MOE_GROUP,
        action="store_true",
        help="Grouped GEMM for the experts.",
    )
    """All local experts in grouped GEMMs (transformer-engine's, or torch's ``grouped_mm``)."""
    moe_router_dtype: Optional[Literal["fp32", "fp64"]] = flag_field(
        None,
        flag="--moe-router-dtype",
        group=MOE_GROUP,
        choices=["fp32", "fp64"],
        help="Router GEMM, gates and the weighting of expert outputs in this dtype instead of "
        "the model's (bf16 under --bf16). Default: fp32 from 32 experts (E x G), as "
        "megatron-core advises; the model's dtype below (README, 'Router precision').",
    )
    """Router GEMM, gates and expert-output weighting in this dtype; None: the model's dtype."""

    def __post_init__(self):
        if self.router_options is None and self.router in ROUTERS:
            object.__setattr__(self, "router_options", ROUTERS[self.router].options())

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A paper preset (``182m``, ``469m``, ``978m``) or the CPU-sized ``tiny``."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def kind(self) -> RouterKind:
        """The router's registry entry."""
        return ROUTERS[self.router]

    @property
    def is_moe(self) -> bool:
        """Its layers hold experts (the registry entry's ``is_moe``)."""
        return self.kind.is_moe

    @property
    def dense_ffn_hidden_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def total_experts(self) -> int:
        """E * G."""
        return self.num_experts * self.granularity

    @property
    def total_topk(self) -> int:
        """k * G."""
        return self.topk * self.granularity

    @property
    def expert_ffn_hidden_size(self) -> int:
        """ffn / G."""
        return self.dense_ffn_hidden_size // self.granularity

    @property
    def nominal_active_experts(self) -> float:
        """Experts a token uses by construction (0 for dense): k*G for TopK and SparseMixer-v2,
        1 for Hash and Lory (one merged FFN), capacity x k*G on average for Expert Choice; for
        ReLU routing the k*G its target sparsity aims at (its log counts the actual ones)."""
        return self.kind.active_experts(self)

    @property
    def target_sparsity(self) -> float:
        """1 - k/E, unchanged by granularity."""
        return 1.0 - self.topk / self.num_experts

    def num_parameters(self) -> int:
        """Total parameters (all experts), as the paper counts them (spec §3's last column)."""
        head_dim = self.hidden_size // self.num_attention_heads
        kv_width = 2 * self.num_query_groups * head_dim
        attention = self.hidden_size * (2 * self.hidden_size + kv_width)
        swiglu = 3 * self.hidden_size  # gate, up and down projections per unit of FFN width
        if self.is_moe:
            mlp = self.total_experts * swiglu * self.expert_ffn_hidden_size
            mlp += self.total_experts * self.hidden_size  # router
        else:
            mlp = swiglu * self.dense_ffn_hidden_size
        norms = 2 * self.hidden_size
        embeddings = 2 * self.vocab_size * self.hidden_size + self.hidden_size  # untied, final norm
        return self.num_layers * (attention + mlp + norms) + embeddings

    def validate(self) -> "ModelConfig":
        """Raise ConfigError on a setting that cannot work; return self."""

        def fail(field_name, message):
            value = getattr(self, field_name)
            raise ConfigError(f"ModelConfig.{field_name}={value}: {message}")

        if self.router not in ROUTERS:
            fail("router", f"not one of {', '.join(ROUTERS)}")
        if not isinstance(self.router_options, self.kind.options):
            raise ConfigError(
                f"ModelConfig.router_options={self.router_options!r}: {self.router} routing "
                f"takes {self.kind.options.__name__}"
            )
        if self.num_attention_heads % self.num_query_groups:
            fail(
                "num_query_groups",
                f"does not divide num_attention_heads={self.num_attention_heads}",
            )
        if self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"does not divide hidden_size={self.hidden_size}")
        if not self.is_moe:
            return self
        if self.topk < 1 or self.topk > self.num_experts:
            fail("topk", f"must be between 1 and num_experts={self.num_experts}")
        if self.granularity < 1 or self.dense_ffn_hidden_size % self.granularity:
            fail(
                "granularity",
                f"does not divide the FFN width {self.dense_ffn_hidden_size}; pick a divisor of it",
            )
        if self.token_dispatcher not in DROPLESS_DISPATCHERS:
            fail("token_dispatcher", f"not supported; use one of {', '.join(DROPLESS_DISPATCHERS)}")
        if self.token_dispatcher == "sorted" and self.moe_expert_capacity_factor is not None:
            fail(
                "token_dispatcher",
                "the sorted token path is dropless; leave the capacity "
                "factor unset or use the alltoall dispatcher",
            )
        if self.moe_router_dtype not in (None, "fp32", "fp64"):
            fail("moe_router_dtype", "not one of None, fp32, fp64")
        if self.kind.adaptive_l1 and self.moe_expert_capacity_factor is not None:
            fail(
                "moe_expert_capacity_factor",
                "ReLU routing is dropless (a token may use 0..E experts); leave the capacity "
                "factor unset",
            )
        if not self.kind.token_dropping and self.moe_expert_capacity_factor is not None:
            fail(
                "moe_expert_capacity_factor",
                f"token dropping is TopK's; {self.router} routing is built dropless, leave the "
                "capacity factor unset",
            )
        for name, message in self.router_options.validate(self):
            if hasattr(self, name):
                fail(name, message)
            value = getattr(self.router_options, name)
            raise ConfigError(f"ModelConfig.router_options.{name}={value}: {message}")
        return self

    def transformer_config(
        self, parallel: "ParallelConfig", *, bf16: bool = False, **overrides
    ) -> TransformerConfig:
        """megatron-core's TransformerConfig for this model under ``parallel``."""
        self.validate()
        parallel.validate_for(self)
        moe = {}
        if self.is_moe:
            moe = dict(
                num_moe_experts=self.total_experts,
                moe_router_topk=self.total_topk,
                moe_ffn_hidden_size=self.expert_ffn_hidden_size,
                # megatron builds its alltoall dispatcher, which the sorted path's layer replaces
                moe_token_dispatcher_type=(
                    "alltoall" if self.token_dispatcher == "sorted" else self.token_dispatcher
                ),
                moe_grouped_gemm=self.moe_grouped_gemm,
                moe_router_dtype=self.moe_router_dtype,
                moe_expert_capacity_factor=self.moe_expert_capacity_factor,
                # The ReLU router has its own regularizer; Hash and Expert Choice are balanced by
                # construction; Lory merges every expert.
                moe_router_load_balancing_type=(
                    "aux_loss"
                    if self.kind.switch_aux_loss and self.moe_aux_loss_coeff > 0
                    else "none"
                ),
                moe_aux_loss_coeff=self.moe_aux_loss_coeff if self.kind.switch_aux_loss else 0.0,
                # TopK: softmax over all experts before the top-k, so k=1 still has a gradient
                # (megatron insists on it for k=1 even though the ReLU router never reads it).
                moe_router_pre_softmax=True,
            )
        kwargs = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.dense_ffn_hidden_size,
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_method_std,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
            sequence_parallel=parallel.sequence_parallel,
            **moe,
        )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over ranks (data parallelism takes the rest of the world)."""

    tensor_model_parallel_size: int = flag_field(
        1,
        flag="--tensor-model-parallel-size",
        group="parallelism",
        help="TP: attention heads and FFN columns split over ranks.",
    )
    pipeline_model_parallel_size: int = flag_field(
        1,
        flag="--pipeline-model-parallel-size",
        group="parallelism",
        help="PP: layers split into stages.",
    )
    expert_model_parallel_size: int = flag_field(
        1,
        flag="--expert-model-parallel-size",
        group="parallelism",
        help="EP: experts split over ranks (carved out of data parallelism).",
    )
    sequence_parallel: bool = flag_field(
        False,
        flag="--sequence-parallel",
        group="parallelism",
        action="store_true",
        needs=("--tensor-model-parallel-size", lambda size: size > 1),
        note="needs --tensor-model-parallel-size > 1; turned off",
        help="Split activations along the sequence in TP regions (needs TP > 1; MoE layers at "
        "TP > 1 require it).",
    )

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    def validate_world(self, world_size: int) -> "ParallelConfig":
        """Check that the layout tiles ``world_size`` ranks."""
        tp, pp, ep = (
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.expert_model_parallel_size,
        )
        if min(tp, pp, ep) < 1:
            raise ConfigError(f"ParallelConfig: sizes must be >= 1, got TP={tp} PP={pp} EP={ep}")
        if world_size % (tp * pp):
            raise ConfigError(
                f"ParallelConfig.tensor_model_parallel_size: TP={tp} x PP={pp} does not divide the "
                f"world size {world_size}; choose sizes whose product divides it"
            )
        # megatron-core places experts on ETP x EP ranks of each pipeline stage (ETP = TP).
        if (world_size // pp) % (tp * ep):
            raise ConfigError(
                f"ParallelConfig.expert_model_parallel_size: TP={tp} x EP={ep} does not divide the "
                f"{world_size // pp} ranks of a pipeline stage (world {world_size} / PP={pp}); "
                "lower EP or TP"
            )
        return self

    def validate_for(self, model: ModelConfig) -> "ParallelConfig":
        """Check that the layout splits ``model`` evenly."""
        tp, pp, ep = (
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.expert_model_parallel_size,
        )
        checks = [
            (
                model.num_layers % pp == 0,
                "pipeline_model_parallel_size",
                f"PP={pp} does not divide num_layers={model.num_layers}",
            ),
            (
                model.num_attention_heads % tp == 0,
                "tensor_model_parallel_size",
                f"TP={tp} does not divide num_attention_heads={model.num_attention_heads}",
            ),
            (
                model.num_query_groups % tp == 0,
                "tensor_model_parallel_size",
                f"TP={tp} does not divide num_query_groups={model.num_query_groups}",
            ),
            (
                not model.is_moe or model.total_experts % ep == 0,
                "expert_model_parallel_size",
                f"EP={ep} does not divide the {model.total_experts} experts",
            ),
            (
                model.is_moe or ep == 1,
                "expert_model_parallel_size",
                "a dense model has no experts to split; use EP=1",
            ),
            (
                model.token_dispatcher != "sorted" or (ep == 1 and tp == 1),
                "expert_model_parallel_size" if ep != 1 else "tensor_model_parallel_size",
                "the sorted token dispatcher keeps every expert and token on its rank "
                f"(EP=1, TP=1), not EP={ep} TP={tp}; use the alltoall dispatcher",
            ),
            (
                not model.kind.routes_by_neighbours or (tp == 1 and not self.sequence_parallel),
                "tensor_model_parallel_size",
                f"{model.router} routing needs whole sequences on a rank (TP={tp} with sequence "
                "parallelism splits them); use TP=1",
            ),
            (
                model.kind.expert_parallel or ep == 1,
                "expert_model_parallel_size",
                f"{model.kind.title} merges all experts' weights on every rank; use EP=1, not "
                f"EP={ep}",
            ),
            # megatron-core's MoE layer refuses to train at TP>1 without it.
            (
                not model.is_moe or tp == 1 or self.sequence_parallel,
                "sequence_parallel",
                f"MoE layers at TP={tp} need sequence parallelism; turn it on",
            ),
        ]
        for ok, field_name, message in checks:
            if not ok:
                raise ConfigError(f"ParallelConfig.{field_name}: {message}")
        return self


@dataclass(frozen=True)
class RecipeFlags:
    """Megatron-LM's flags that the LLaMA recipe (spec §3) fixes, under Megatron-LM's defaults:
    any other value than ``must`` is refused, all of them at once (a Megatron-LM default command
    line misses several). The recipe is built in: nothing stores them."""

    normalization: str = flag_field(
        "LayerNorm",
        flag="--normalization",
        group=ARCH,
        choices=["LayerNorm", "RMSNorm"],
        must="RMSNorm",
        refusal="must be RMSNorm, not {value}",
        help="Norm layer; must be RMSNorm.",
    )
    swiglu: bool = flag_field(
        False,
        flag="--swiglu",
        group=ARCH,
        action="store_true",
        must=True,
        refusal="must be given",
        help="SwiGLU MLP (required).",
    )
    untie_embeddings_and_output_weights: bool = flag_field(
        False,
        flag="--untie-embeddings-and-output-weights",
        group=ARCH,
        action="store_true",
        must=True,
        refusal="must be given (tied embeddings are not built)",
        help="Separate input embedding and output layer (required).",
    )
    position_embedding_type: str = flag_field(
        "learned_absolute",
        flag="--position-embedding-type",
        group=ARCH,
        choices=["learned_absolute", "rope", "none"],
        must="rope",
        refusal="must be rope, not {value}",
        help="Position embedding; must be rope.",
    )
    add_position_embedding: bool = flag_field(
        True,
        flag="--no-position-embedding",
        group=ARCH,
        action="store_false",
        dest="add_position_embedding",
        help="No learned absolute position embedding (implied by rope).",
    )
    add_bias_linear: bool = flag_field(
        True,
        flag="--disable-bias-linear",
        group=ARCH,
        action="store_false",
        dest="add_bias_linear",
        must=False,
        refusal="must be given (linear layers have no bias)",
        help="No bias in linear layers (required).",
    )
    hidden_dropout: float = flag_field(
        0.1,
        flag="--hidden-dropout",
        group="regularization",
        must=0.0,
        refusal="must be 0.0, not {value}{if_default}",
        help="Hidden dropout; must be 0.0.",
    )
    attention_dropout: float = flag_field(
        0.1,
        flag="--attention-dropout",
        group="regularization",
        must=0.0,
        refusal="must be 0.0, not {value}{if_default}",
        help="Attention dropout; must be 0.0.",
    )


@dataclass(frozen=True)
class UnbuiltFlags:
    """Megatron-LM's flags whose other values are not built here, refused one at a time: the
    model's when the model is mapped, the layout's (group ``parallelism``) with the layout."""

    rotary_percent: float = flag_field(
        1.0,
        flag="--rotary-percent",
        group=ARCH,
        must=1.0,
        refusal="must be 1.0: the builder rotates whole heads",
        help="Fraction of each head rotated; must be 1.0.",
    )
    moe_layer_freq: object = flag_field(
        1,
        flag="--moe-layer-freq",
        group=MOE_GROUP,
        type=int_or_list,
        must=lambda value, args: args.num_experts is None or value in (1, [1] * args.num_layers),
        refusal="must be 1: the builder makes every layer an MoE layer",
        help="Which layers are MoE layers; must be 1 (all of them).",
    )
    fp16: bool = flag_field(
        False,
        flag="--fp16",
        group="mixed precision",
        action="store_true",
        must=False,
        refusal="is not supported: use --bf16",
        help="Not supported: use --bf16.",
    )
    num_layers_per_virtual_pipeline_stage: Optional[int] = flag_field(
        None,
        flag="--num-layers-per-virtual-pipeline-stage",
        group="parallelism",
        type=int,
        must=None,
        refusal="is not supported (no interleaved pipeline)",
        help="Interleaved pipeline schedule; not supported.",
    )
    context_parallel_size: int = flag_field(
        1,
        flag="--context-parallel-size",
        group="parallelism",
        must=1,
        refusal="must be 1 (no context parallelism)",
        help="CP; must be 1.",
    )
    expert_tensor_parallel_size: Optional[int] = flag_field(
        None,
        flag="--expert-tensor-parallel-size",
        group="parallelism",
        type=int,
        must=lambda value, args: value in (None, args.tensor_model_parallel_size),
        refusal="must equal --tensor-model-parallel-size ({tensor_model_parallel_size})",
        help="Expert TP; must equal TP (the default).",
    )
