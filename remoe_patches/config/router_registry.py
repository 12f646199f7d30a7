"""The router registry: every router kind the model can build, one entry each.

An entry (``RouterKind``) holds everything the rest of the code asks about a kind: its options
(a frozen dataclass, ``ModelConfig.router_options``, whose fields declare their flags:
``flag_fields``), its names
(``name`` in configs and checkpoints, ``title`` in tables and plots, ``sweep_name`` in sweep
files and ``configs/<size>_<sweep_name>.yaml``), how megatron-core's MoE layer gets it (a builder
for the ``MoESubmodules.router`` slot, or a rewrite of the decoder spec), and the properties the
config checks, the parser and the logs need. ``TopKRouterFlags`` declares the flags of megatron's
TopKRouter options that the kinds honour (``topk_router_flags``). Builders are named
``"module:function"`` and imported when a model is built, so this module stays free of torch and
megatron (the sweep tool and the analysis read it without loading either).

Adding a router: its routing math and its megatron adapter in their own modules, its options
dataclass and one ``RouterKind`` entry here. Nothing else compares router kinds.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from remoe_patches.config.flag_fields import flag_field

if TYPE_CHECKING:
    from remoe_patches.config.model_config import ModelConfig


MOE_GROUP = "mixture of experts"
"""The argparse group the routers' option flags are listed in."""


def option(default, flag: str, help: str, **argparse_kwargs):
    """A router option set by ``flag`` (``flag_fields.flag_field`` in the MoE flags' group)."""
    return flag_field(default, flag=flag, help=help, group=MOE_GROUP, **argparse_kwargs)


# ---------------------------------------------------------------------------------------------
# Each router's options. ``validate(model)`` returns the problems as (field, message) pairs.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoOptions:
    """A router without options of its own (dense, TopK: megatron's own flags configure it)."""

    def validate(self, model: "ModelConfig") -> list:
        return []


@dataclass(frozen=True)
class ReLUOptions:
    """ReMoE: the adaptive L1 regularizer that holds the sparsity at 1 - k/E (spec §2)."""

    l1_coeff_init: float = option(
        1e-8, "--moe-relu-l1-reg-coeff-init", "ReMoE: initial L1 coefficient lambda_0."
    )
    """lambda_0 of the adaptive L1 coefficient."""
    l1_coeff_multiplier: float = option(
        1.2,
        "--moe-relu-l1-reg-coeff-multiplier",
        "ReMoE: factor alpha of the adaptive L1 coefficient.",
    )
    """alpha of the adaptive L1 coefficient."""
    load_balancing: bool = True
    """L1 with load balancing (Eq. 10) or plain L1 (Eq. 9); set by Megatron-LM's
    ``--moe-router-load-balancing-type`` (``none``: plain L1)."""

    def validate(self, model: "ModelConfig") -> list:
        problems = []
        if self.l1_coeff_multiplier <= 1.0:
            problems.append(("l1_coeff_multiplier", "must be > 1"))
        if self.l1_coeff_init <= 0.0:
            problems.append(("l1_coeff_init", "must be > 0"))
        return problems


HASH_TYPES = ("mod", "random_permutation")
"""Hash routing's map of token ids to experts: ``mod`` (expert = id mod E, the ReMoE paper's
Table 2 setting) or ``random_permutation`` (a seeded random permutation of the vocabulary dealt
round-robin to the experts)."""


@dataclass(frozen=True)
class HashOptions:
    """Hash Layers (Roller et al. 2021): a fixed map of token ids to experts."""

    hash_type: str = option(
        "mod",
        "--moe-hash-type",
        "Hash routing's map of token ids to experts: mod (expert = token id mod E, the ReMoE "
        "paper's setting; default) or random_permutation (a seeded random permutation of the "
        "vocabulary dealt round-robin to the experts, --moe-hash-seed).",
        choices=HASH_TYPES,
    )
    """``mod`` (expert = token id mod E, the ReMoE paper's setting) or ``random_permutation``
    (a seeded random permutation of the vocabulary dealt round-robin to the experts)."""
    seed: int = option(
        0,
        "--moe-hash-seed",
        "Hash routing: seed of --moe-hash-type random_permutation.",
        needs=("--moe-hash-type", "random_permutation"),
    )
    """The seed of the ``random_permutation`` hash."""

    def validate(self, model: "ModelConfig") -> list:
        problems = []
        if self.hash_type not in HASH_TYPES:
            problems.append(("hash_type", f"not one of {', '.join(HASH_TYPES)}"))
        if model.total_topk != 1:
            problems.append(
                (
                    "topk",
                    "hash routing sends each token to exactly one expert; use "
                    "k=1 and granularity 1",
                )
            )
        return problems


EXPERT_CHOICE_GROUPS = ("sequence", "batch")
"""Which tokens an Expert Choice expert chooses among: each sequence's, or the micro-batch's."""


@dataclass(frozen=True)
class ExpertChoiceOptions:
    """Expert Choice (Zhou et al. 2022): each expert picks its tokens."""

    capacity_factor: float = option(
        1.0,
        "--moe-expert-choice-capacity-factor",
        "Expert Choice: each expert takes capacity x k / E of its group's tokens.",
    )
    """Each expert takes ``factor * k / E`` of its group's tokens."""
    group: str = option(
        "sequence",
        "--moe-expert-choice-group",
        "Expert Choice: an expert chooses among each sequence's tokens or the micro-batch's "
        "(both see later tokens of a sequence: README, 'Table 2 baselines').",
        choices=EXPERT_CHOICE_GROUPS,
    )
    """The tokens an expert chooses among, ``sequence`` or ``batch``."""

    def validate(self, model: "ModelConfig") -> list:
        problems = []
        if self.group not in EXPERT_CHOICE_GROUPS:
            problems.append(("group", f"not one of {', '.join(EXPERT_CHOICE_GROUPS)}"))
        if not self.capacity_factor > 0:
            problems.append(("capacity_factor", "must be > 0"))
        return problems


SPARSEMIXER_TOPK = (1, 2)
"""The reference's ``assert top_k in [1, 2]``: one pass per picked expert."""


@dataclass(frozen=True)
class SparseMixerOptions:
    """SparseMixer-v2 (GRIN-MoE): sampled TopK with a Heun-style gradient for the router."""

    jitter_eps: float = option(
        0.01,
        "--moe-sparsemixer-jitter-eps",
        "SparseMixer-v2: experts within this relative band of the top logit are sampled.",
    )
    """The relative band around the top logit an expert is sampled from (GRIN's 0.01)."""

    def validate(self, model: "ModelConfig") -> list:
        problems = []
        if model.total_topk not in SPARSEMIXER_TOPK:
            problems.append(
                ("topk", "SparseMixer-v2 samples one or two experts per token; use k*G of 1 or 2")
            )
        if not self.jitter_eps > 0:
            problems.append(("jitter_eps", "must be > 0"))
        return problems


LORY_FIRST_SEGMENT_RULES = ("own_detached", "uniform")
"""How Lory routes a sequence's first segment: ``own_detached`` (Lory's Algorithm 1: its own
mean, stop-gradient) or ``uniform`` (weights 1/E: strictly causal)."""


@dataclass(frozen=True)
class LoryOptions:
    """Lory (Zhong et al. 2024): experts merged into one FFN per segment."""

    segment_length: int = option(
        256,
        "--moe-lory-segment-length",
        "Lory: tokens per segment (segment i is routed from segment i-1).",
    )
    """Tokens per segment; segment i is routed from segment i-1's mean."""
    dense_warmup_fraction: float = option(
        0.05,
        "--moe-lory-dense-warmup-fraction",
        "Lory: train the layers as a dense FFN for this share of the steps, then start every "
        "expert as a copy of it (the Lory paper's 5%%; 0 turns it off).",
    )
    """The share of the training steps the layers are a dense FFN (expert 0's weights) before
    every expert starts as a copy of it (the Lory paper's 5%; 0 turns it off)."""
    first_segment: str = option(
        "own_detached",
        "--moe-lory-first-segment",
        "Lory: route the first segment from its own mean without gradient (the paper) or "
        "uniformly (strictly causal).",
        choices=LORY_FIRST_SEGMENT_RULES,
    )
    """The first segment is routed from its own mean without gradient (the paper's rule), or
    ``uniform`` (strictly causal)."""

    @classmethod
    def for_sequence_length(cls, seq_length: int) -> "LoryOptions":
        """The defaults with segments that divide ``seq_length``: the paper's 256 tokens, or the
        largest power of two dividing both (one segment of a shorter power-of-two sequence)."""
        return cls(segment_length=math.gcd(cls().segment_length, seq_length))

    def validate(self, model: "ModelConfig") -> list:
        problems = []
        if self.segment_length < 1 or model.seq_length % self.segment_length:
            problems.append(
                (
                    "segment_length",
                    f"must divide seq_length={model.seq_length}; pick a divisor of it",
                )
            )
        if not 0.0 <= self.dense_warmup_fraction < 1.0:
            problems.append(("dense_warmup_fraction", "must be in [0, 1)"))
        if self.first_segment not in LORY_FIRST_SEGMENT_RULES:
            problems.append(("first_segment", f"not one of {', '.join(LORY_FIRST_SEGMENT_RULES)}"))
        return problems


# ---------------------------------------------------------------------------------------------
# The entries
# ---------------------------------------------------------------------------------------------

TOPK_ROUTER_FLAGS = (
    "moe_router_pre_softmax",
    "moe_aux_loss_coeff",
    "moe_router_topk_scaling_factor",
    "moe_router_score_function",
    "moe_router_enable_expert_bias",
    "moe_router_bias_update_rate",
    "moe_input_jitter_eps",
    "moe_z_loss_coeff",
)
"""megatron's TopKRouter options (flag dests); a kind lists those it honours."""


@dataclass(frozen=True)
class TopKRouterFlags:
    """The flags of megatron's TopKRouter options that ``ModelConfig`` does not hold (they go to
    ``LayerOptions.topk_router`` for the kinds that honour them); never instantiated."""

    moe_router_load_balancing_type: str = option(
        "aux_loss",
        "--moe-router-load-balancing-type",
        "TopK: aux_loss (Switch) or none; ReLU routing: anything but none keeps the L1 "
        "regularizer load-balanced (Eq. 10), none makes it plain L1 (Eq. 9).",
        choices=["aux_loss", "seq_aux_loss", "sinkhorn", "none"],
    )
    moe_router_pre_softmax: bool = option(
        False,
        "--moe-router-pre-softmax",
        "TopK: softmax over all experts before the top-k (needed for k=1).",
        action="store_true",
    )
    moe_z_loss_coeff: Optional[float] = option(
        None, "--moe-z-loss-coeff", "Weight of TopK's router z-loss.", type=float
    )
    moe_router_topk_scaling_factor: Optional[float] = option(
        None,
        "--moe-router-topk-scaling-factor",
        "TopK: multiply the chosen experts' gates by this (e.g. E with k=1 and pre-softmax, so "
        "that a gate starts near 1 rather than 1/E).",
        type=float,
    )
    moe_router_score_function: str = option(
        "softmax",
        "--moe-router-score-function",
        "TopK: the score the top-k picks from.",
        choices=["softmax", "sigmoid"],
    )
    moe_router_enable_expert_bias: bool = option(
        False,
        "--moe-router-enable-expert-bias",
        "TopK: aux-loss-free load balancing with a per-expert bias in the top-k selection "
        "(needs --moe-router-score-function sigmoid).",
        action="store_true",
    )
    moe_router_bias_update_rate: float = option(
        1e-3,
        "--moe-router-bias-update-rate",
        "TopK: step of the expert bias update (--moe-router-enable-expert-bias).",
        needs=("--moe-router-enable-expert-bias",),
    )
    moe_input_jitter_eps: Optional[float] = option(
        None,
        "--moe-input-jitter-eps",
        "TopK: multiply the router input by uniform noise in [1-eps, 1+eps] while training.",
        type=float,
    )
    moe_token_drop_policy: str = option(
        "probs",
        "--moe-token-drop-policy",
        "TopK with a capacity factor: drop the lowest-probability tokens or the last ones.",
        choices=["probs", "position"],
        needs=("--moe-expert-capacity-factor",),
        note="only with --moe-expert-capacity-factor (token dropping)",
    )
    moe_pad_expert_input_to_capacity: bool = option(
        False,
        "--moe-pad-expert-input-to-capacity",
        "TopK: pad each expert's input to the capacity.",
        action="store_true",
    )


@dataclass(frozen=True)
class RouterKind:
    """One router kind and everything the code asks about it."""

    name: str
    """``ModelConfig.router``, ``--moe-router-type`` and checkpoints: ``relu``."""
    title: str
    """Tables and plots: ``ReMoE``."""
    sweep_name: str
    """Sweep files' ``router:`` and ``configs/<size>_<sweep_name>.yaml``: ``remoe``."""
    summary: str
    """Half a line for ``--moe-router-type``'s help."""
    is_moe: bool = True
    """Its layers hold experts (and a router); False: a dense FFN."""
    options: type = NoOptions
    """Its options dataclass (``ModelConfig.router_options``)."""
    options_for_sequence_length: Optional[Callable] = None
    """``function(seq_length)``: its default options fitted to sequences of that length, where a
    default must divide it (Lory's segments); None: ``options()``."""
    legacy_flat_fields: dict = field(default_factory=dict)
    """Checkpoints from before the registry held the router options as flat ``ModelConfig``
    fields: each old field's name mapped to the options field it became."""
    legacy_defaults: dict = field(default_factory=dict)
    """Options fields for a run saved with the flat fields that did not exist yet then, set to
    what such a run was trained with (``run_config`` rebuilds it from them)."""
    router_builder: Optional[str] = None
    """``"module:function"``, ``function(model_config, regularizer)`` returning the builder of
    megatron-core's ``MoESubmodules.router`` slot; None keeps megatron's TopKRouter."""
    block_spec: Optional[str] = None
    """``"module:function"``, ``function(block_spec, model_config)`` rewriting the decoder spec
    (Lory replaces the whole MoE layer)."""
    prepare_model: Optional[str] = None
    """``"module:function"``, ``function(gpt_model)`` called on each built model chunk."""
    active_experts: Callable = lambda model: float(model.total_topk)
    """Experts a token uses by construction (ReMoE: the k*G its target sparsity aims at)."""
    megatron_topk_router: bool = False
    """It is megatron's TopKRouter: its flags and megatron-core's rules on them apply."""
    topk_router_flags: tuple = ()
    """The megatron TopKRouter options it honours (``TOPK_ROUTER_FLAGS``)."""
    switch_aux_loss: bool = False
    """Balanced by megatron's Switch aux loss (``--moe-aux-loss-coeff``)."""
    token_dropping: bool = False
    """May drop tokens (``--moe-expert-capacity-factor``); the others are built dropless."""
    adaptive_l1: bool = False
    """Trained with the adaptive L1 regularizer that holds the sparsity at 1 - k/E (ReMoE):
    its log has the sparsity, the coefficient and the regularization loss."""
    experts_per_token_vary: bool = False
    """A token may get more than k experts, which megatron's fused permutation cannot hold."""
    routes_by_token_ids: bool = False
    """Routes by the input's token ids, held from the last forward (not recomputable under
    pipeline parallelism)."""
    routes_by_neighbours: bool = False
    """Routes a token by the other tokens of its sequence (Expert Choice's competition for
    places, Lory's segment means): it needs whole sequences on a rank (TP = 1, no sequence
    parallelism), and padding would change a real token's routing (lm-eval runs it one unpadded
    row at a time)."""
    expert_parallel: bool = True
    """Its experts can be split over ranks (EP > 1)."""
    sweep_flags: dict = field(default_factory=dict)
    """What a sweep's ``router:`` switch sets (``configs/<size>_<sweep_name>.yaml``'s settings)."""

    @property
    def routing_flag(self) -> str:
        """The flag that asks for it: the ReMoE fork's ``--moe-relu-routing`` for ReLU routing,
        ``--moe-router-type NAME`` otherwise."""
        return "--moe-relu-routing" if self.adaptive_l1 else f"--moe-router-type {self.name}"

    @property
    def layer_topk_router_options(self) -> tuple:
        """The names it reads from ``LayerOptions.topk_router``: the TopKRouter options it
        honours but the model's ``moe_aux_loss_coeff``, and token dropping's."""
        dropping = ("moe_token_drop_policy", "moe_pad_expert_input_to_capacity")
        names = tuple(name for name in self.topk_router_flags if name != "moe_aux_loss_coeff")
        return names + (dropping if self.token_dropping else ())

    def default_options(self, seq_length: int):
        """Its options' defaults for a model of sequences of ``seq_length`` tokens."""
        if self.options_for_sequence_length is not None:
            return self.options_for_sequence_length(seq_length)
        return self.options()

    def build_router(self, model: "ModelConfig", regularizer=None):
        """The ``MoESubmodules.router`` builder, or None for megatron's TopKRouter."""
        return _resolve(self.router_builder)(model, regularizer) if self.router_builder else None

    def rewrite_block_spec(self, block_spec, model: "ModelConfig"):
        """``block_spec`` as this kind builds it."""
        return _resolve(self.block_spec)(block_spec, model) if self.block_spec else block_spec

    def prepare(self, gpt_model) -> None:
        """What the kind does to a built model chunk (Hash: feed it the token ids)."""
        if self.prepare_model:
            _resolve(self.prepare_model)(gpt_model)


def _resolve(path: str):
    module, function = path.split(":")
    return getattr(importlib.import_module(module), function)


def _no_experts(model) -> float:
    return 0.0


def _one_expert(model) -> float:
    return 1.0


def _capacity_times_k(model) -> float:
    return model.router_options.capacity_factor * model.total_topk


ROUTERS: dict = {
    kind.name: kind
    for kind in (
        RouterKind(
            "dense", "Dense", "dense", "no experts", is_moe=False, active_experts=_no_experts
        ),
        RouterKind(
            "topk",
            "TopK MoE",
            "moe",
            "megatron's TopKRouter (default)",
            megatron_topk_router=True,
            topk_router_flags=TOPK_ROUTER_FLAGS,
            switch_aux_loss=True,
            token_dropping=True,
            # The project's dMoE baseline (README "A fair TopK baseline"): the Switch aux loss,
            # softmax before the top-k, and the chosen gates scaled by E/k.
            sweep_flags=dict(
                moe_router_load_balancing_type="aux_loss",
                moe_aux_loss_coeff=0.01,
                moe_router_pre_softmax=True,
                moe_router_topk_scaling_factor="E/k",
            ),
        ),
        RouterKind(
            "relu",
            "ReMoE",
            "remoe",
            "ReMoE's ReLU router",
            options=ReLUOptions,
            router_builder="remoe_patches.model.routers.relu_router:router_builder_for",
            adaptive_l1=True,
            experts_per_token_vary=True,
            legacy_flat_fields=dict(
                relu_l1_coeff_init="l1_coeff_init",
                relu_l1_coeff_multiplier="l1_coeff_multiplier",
                relu_load_balancing="load_balancing",
            ),
            sweep_flags=dict(moe_relu_routing=True),
        ),
        RouterKind(
            "hash",
            "Hash",
            "hash",
            "Hash Layers",
            options=HashOptions,
            router_builder="remoe_patches.model.routers.hash_router:router_builder_for",
            prepare_model="remoe_patches.model.routers.hash_router:feed_token_ids",
            active_experts=_one_expert,
            routes_by_token_ids=True,
            legacy_flat_fields=dict(hash_type="hash_type", hash_seed="seed"),
            # Saved before the hash type existed: hash runs then used the seeded random permutation
            # and must be rebuilt with the map they were trained with.
            legacy_defaults=dict(hash_type="random_permutation"),
            sweep_flags=dict(moe_router_type="hash"),
        ),
        RouterKind(
            "expert_choice",
            "Expert Choice",
            "ec",
            "Expert Choice",
            options=ExpertChoiceOptions,
            router_builder="remoe_patches.model.routers.expert_choice_router:router_builder_for",
            active_experts=_capacity_times_k,
            experts_per_token_vary=True,
            routes_by_neighbours=True,
            legacy_flat_fields=dict(
                expert_choice_capacity_factor="capacity_factor", expert_choice_group="group"
            ),
            sweep_flags=dict(moe_router_type="expert_choice"),
        ),
        RouterKind(
            "sparsemixer",
            "SparseMixer-v2",
            "sparsemixer",
            "SparseMixer-v2",
            options=SparseMixerOptions,
            router_builder="remoe_patches.model.routers.sparsemixer_router:router_builder_for",
            topk_router_flags=("moe_aux_loss_coeff", "moe_input_jitter_eps", "moe_z_loss_coeff"),
            switch_aux_loss=True,
            legacy_flat_fields=dict(sparsemixer_jitter_eps="jitter_eps"),
            # GRIN's Switch aux loss
            sweep_flags=dict(
                moe_router_type="sparsemixer",
                moe_router_load_balancing_type="aux_loss",
                moe_aux_loss_coeff=0.01,
            ),
        ),
        RouterKind(
            "lory",
            "Lory",
            "lory",
            "Lory (merged experts)",
            options=LoryOptions,
            options_for_sequence_length=LoryOptions.for_sequence_length,
            block_spec="remoe_patches.model.routers.lory_layer:block_spec_for",
            active_experts=_one_expert,
            routes_by_neighbours=True,
            expert_parallel=False,
            legacy_flat_fields=dict(
                lory_segment_length="segment_length",
                lory_dense_warmup_fraction="dense_warmup_fraction",
                lory_first_segment="first_segment",
            ),
            legacy_defaults=dict(dense_warmup_fraction=0.0),  # trained before the warm-up existed
            sweep_flags=dict(moe_router_type="lory"),
        ),
    )
}
"""Every router kind by ``name``."""

SWEEP_NAMES: dict = {kind.sweep_name: kind for kind in ROUTERS.values()}
"""Every router kind by its sweep name."""


def router_kind(name: str) -> RouterKind:
    """The entry of ``name``; ValueError listing the kinds otherwise."""
    try:
        return ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}") from None


def sweep_router_title(value) -> str:
    """The display title of a sweep file's ``router:`` value (anything else as written)."""
    kind = SWEEP_NAMES.get(value)
    return kind.title if kind is not None else str(value)
