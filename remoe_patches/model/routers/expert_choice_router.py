"""``ExpertChoiceRouter``: Expert Choice routing (Zhou et al. 2022, arXiv 2202.09368) as a
megatron-core Router for ``MoESubmodules.router``; a baseline of the paper's Table 2.

Shape suffixes: S = sequence positions, B = sequences, T = S*B tokens (s-major), E = experts.

Scores are the softmax over experts of the router logits, in fp32; each expert takes the C
tokens of a group with its highest scores, ``C = round(capacity_factor * N * k / E)`` (N tokens
per group, k = ``moe_router_topk``); a chosen pair's gate is its score, the rest are 0. A token
may get 0..E experts; every expert gets exactly C tokens per group, so the load is balanced by
construction and there is no auxiliary loss. Groups: ``"sequence"`` (each expert chooses among
each sequence's tokens separately) or ``"batch"`` (among all tokens of the micro-batch).

Causality: choosing among a sequence's tokens leaks information from later tokens into the
routing of earlier ones in a causal LM: whether token t gets expert e depends on the scores of
the tokens after t that compete for e's C places, so the output at t depends on the future
(``tests/model/routers/test_expert_choice_router.py`` shows it on a model). The EC paper names this
as its limitation for auto-regressive generation. Per-sequence grouping bounds the leak to the
sequence's own future tokens (``"batch"`` also leaks across the micro-batch's sequences), it
does not remove it. The ReMoE paper reports EC in Table 2 without saying how it handled this,
and its released code contains no EC router. Consequences: the training loss is optimistic
relative to a causal model, and token-by-token generation with a KV cache (one new token per
forward: every expert then takes it) does not match training; full-sequence scoring (the
zero-shot evaluation's loglikelihoods) routes like training, padding tokens included.

Parallelism: the choice needs every token of a group on the rank, so sequence parallelism
(TP>1 with ``sequence_parallel``) and context parallelism, which leave a rank part of each
sequence, are refused.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.moe.router import Router
from megatron.core.transformer.transformer_config import TransformerConfig

from remoe_patches.routing.expert_choice_routing import EXPERT_CHOICE_GROUPS, expert_choice_routing
from remoe_patches.config.model_config import ConfigError


class ExpertChoiceRouter(Router):
    """Each expert chooses its top-C tokens per group (see the module docstring).

    Args:
        config: the model's TransformerConfig; ``moe_router_topk`` is k in the capacity.
        pg_collection: megatron-core process groups (given by MoELayer).
        capacity_factor: C is ``capacity_factor * k`` tokens per expert per N/E group tokens.
        group: ``"sequence"`` or ``"batch"``, the tokens an expert chooses among.
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection=None,
        *,
        capacity_factor: float = 1.0,
        group: str = "sequence",
    ):
        _validate(capacity_factor, group)
        if config.sequence_parallel and config.tensor_model_parallel_size > 1:
            raise ConfigError(
                "ExpertChoiceRouter: sequence parallelism at TP="
                f"{config.tensor_model_parallel_size} leaves each rank part of every sequence, "
                "but every expert must choose among whole groups; use TP=1"
            )
        if config.context_parallel_size > 1:
            raise ConfigError(
                f"ExpertChoiceRouter: context parallelism (CP={config.context_parallel_size}) "
                "leaves each rank part of every sequence, but every expert must choose among "
                "whole groups; use CP=1"
            )
        super().__init__(config=config, pg_collection=pg_collection)
        self.topk = config.moe_router_topk
        self.capacity_factor = capacity_factor
        self.group = group

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """``(gates_TE, routing_map_TE)`` for hidden states ``input`` [s, b, h]."""
        if padding_mask is not None:
            raise NotImplementedError(
                "ExpertChoiceRouter does not support padding masks: padding tokens would take "
                "experts' places; pretraining sequences are unpadded"
            )
        return self.routing(self.gating(input))

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """The logits ``x W_r^T`` [s, b, E], in fp32 (fp64 with ``moe_router_dtype='fp64'``).
        A plain GEMM: megatron's custom autograd gating pays only with transformer-engine."""
        dtype = torch.float64 if self.config.moe_router_dtype == "fp64" else torch.float32
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(input.to(dtype), self.weight.to(dtype), bias)

    def routing(self, logits: torch.Tensor):
        """Expert Choice over the logits [s, b, E]."""
        return expert_choice_routing(
            logits, topk=self.topk, capacity_factor=self.capacity_factor, group=self.group
        )


def _validate(capacity_factor: float, group: str) -> None:
    if (
        isinstance(capacity_factor, bool)
        or not isinstance(capacity_factor, (int, float))
        or not math.isfinite(capacity_factor)
        or capacity_factor <= 0
    ):
        raise ConfigError(
            f"expert_choice_router_builder: capacity_factor must be a finite number > 0 "
            f"(1.0 gives each token k experts on average), got {capacity_factor!r}"
        )
    if group not in EXPERT_CHOICE_GROUPS:
        raise ConfigError(
            f"expert_choice_router_builder: group must be one of {EXPERT_CHOICE_GROUPS}, "
            f"got {group!r}"
        )


def expert_choice_router_builder(capacity_factor: float = 1.0, group: str = "sequence"):
    """A RouterBuilder for ``MoESubmodules.router``: ``ExpertChoiceRouter`` with these settings."""
    _validate(capacity_factor, group)
    return functools.partial(ExpertChoiceRouter, capacity_factor=capacity_factor, group=group)


def router_builder_for(model, regularizer=None):
    """The registry's builder (``router_registry``): Expert Choice with ``model``'s options."""
    options = model.router_options
    return expert_choice_router_builder(options.capacity_factor, options.group)
