"""``SparseMixerRouter``: SparseMixer-v2 routing (GRIN) as a megatron-core router, for
``MoESubmodules.router``.

Shape suffixes: T = tokens this rank routes, E = experts, K = experts per token.

A subclass of megatron-core's ``TopKRouter`` that keeps its gating GEMM, input jitter, z-loss and
load-balancing machinery and replaces only the choice of experts and the gates by
``sparsemixer.sparsemixer_v2`` (sampled experts while training, GRIN's router-gradient
estimator, argmax at evaluation). ``moe_aux_loss_coeff`` and ``moe_router_load_balancing_type``
(``aux_loss``, ``seq_aux_loss``, ``global_aux_loss`` or a list of them) work as for TopK, through
``TopKRouter._apply_*aux_loss``: ``P_i`` is the mean full softmax over the tokens (megatron's
``compute_routing_scores_for_aux_loss``, the reference's ``original_gates``) and ``f_i`` counts
the experts the tokens were actually sent to, the samples, as the SparseMixer reference's balance
loss does (``one_hot(sample)``); for TopK the two counts coincide.

Refused, with a ConfigError naming the TransformerConfig field: k other than 1 or 2, sinkhorn
balancing, a score function other than softmax, expert bias, group-limited routing, a top-k
scaling factor, token dropping (capacity factor), routing replay and forced load balancing:
each changes which experts are picked or how gates are formed, which SparseMixer-v2 defines
itself. Padding masks are refused as in ``ReLURouter`` (pretraining sequences are unpadded).
Tensor, sequence, context and expert parallelism need nothing extra: the aux loss reduces its
counts over the tensor-and-context group as TopK's does, and the samples come from the default
generator, which megatron seeds alike on tensor-parallel ranks (see ``sparsemixer``).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from remoe_patches.routing import sparsemixer
from remoe_patches.config.model_config import ConfigError


def check_config(config: TransformerConfig) -> None:
    """Raise ConfigError on a TransformerConfig setting SparseMixer-v2 cannot honour."""

    def fail(field_name, fix):
        raise ConfigError(
            f"TransformerConfig.{field_name}={getattr(config, field_name)!r}: not supported by "
            f"the SparseMixer-v2 router; {fix}"
        )

    if config.moe_router_topk not in sparsemixer.SUPPORTED_TOPK:
        fail("moe_router_topk", "use 1 or 2 (one sampling pass per expert, as GRIN's reference)")
    balancing = config.moe_router_load_balancing_type
    if balancing == "sinkhorn" or (isinstance(balancing, list) and "sinkhorn" in balancing):
        fail(
            "moe_router_load_balancing_type",
            "use aux_loss, seq_aux_loss, global_aux_loss or none (sinkhorn picks the experts)",
        )
    if config.moe_router_score_function != "softmax":
        fail("moe_router_score_function", "use softmax (SparseMixer-v2 samples from a softmax)")
    if config.moe_router_enable_expert_bias:
        fail("moe_router_enable_expert_bias", "set it False (the bias would shift the top-k only)")
    if config.moe_router_num_groups is not None or config.moe_router_group_topk is not None:
        field_name = (
            "moe_router_num_groups"
            if config.moe_router_num_groups is not None
            else "moe_router_group_topk"
        )
        fail(field_name, "leave it None (no group-limited routing)")
    if config.moe_router_topk_scaling_factor is not None:
        fail("moe_router_topk_scaling_factor", "leave it None (the gates are pi_z, unscaled)")
    if config.moe_expert_capacity_factor is not None:
        fail("moe_expert_capacity_factor", "leave it None (GRIN trains dropless)")
    if config.moe_enable_routing_replay:
        fail("moe_enable_routing_replay", "set it False (the experts are sampled)")
    if config.moe_router_force_load_balancing:
        fail("moe_router_force_load_balancing", "set it False")


class SparseMixerRouter(TopKRouter):
    """SparseMixer-v2 routing: ``forward(input [s, b, h]) -> (probs_TE, routing_map_TE)``.

    Args:
        config: the model's TransformerConfig (``moe_router_topk`` 1 or 2; see ``check_config``).
        pg_collection: megatron-core process groups (given by MoELayer).
        jitter_eps: the jitter mask's ``r`` (``sparsemixer`` step 1).
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection=None,
        *,
        jitter_eps: float = sparsemixer.JITTER_EPS_DEFAULT,
    ):
        check_config(config)
        super().__init__(config=config, pg_collection=pg_collection)
        self.jitter_eps = sparsemixer.validate_jitter_eps(jitter_eps)

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Input jitter (``moe_input_jitter_eps``), the gating GEMM, then ``routing``."""
        if padding_mask is not None:
            raise NotImplementedError(
                "SparseMixerRouter does not support padding masks: pretraining sequences are "
                "unpadded"
            )
        logits = self.gating(self.apply_input_jitter(input))
        return self.routing(logits)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """``(probs_TE, routing_map_TE)`` of ``logits`` [s, b, E], with TopK's z-loss and aux
        losses attached (the latter only where a backward follows, as TopK)."""
        if padding_mask is not None:
            raise NotImplementedError("SparseMixerRouter does not support padding masks")
        seq_length, batch_size = logits.shape[:2]
        logits_TE = self.apply_z_loss(logits.view(-1, self.num_experts))
        gates_TK, experts_TK = sparsemixer.sparsemixer_v2(
            logits_TE, topk=self.topk, jitter_eps=self.jitter_eps, training=self.training
        )
        probs_TE, routing_map_TE = sparsemixer.dense_routing(gates_TK, experts_TK, self.num_experts)
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            _, scores_for_aux_loss_TE = compute_routing_scores_for_aux_loss(
                logits_TE, self.topk, self.score_function, fused=self.config.moe_router_fusion
            )
            probs_TE = self._apply_aux_loss(probs_TE, scores_for_aux_loss_TE, routing_map_TE)
            probs_TE = self._apply_seq_aux_loss(
                probs_TE, scores_for_aux_loss_TE, routing_map_TE, seq_length, batch_size
            )
            probs_TE = self._apply_global_aux_loss(probs_TE, scores_for_aux_loss_TE, routing_map_TE)
        return probs_TE, routing_map_TE


def sparsemixer_router_builder(jitter_eps: float = sparsemixer.JITTER_EPS_DEFAULT):
    """A RouterBuilder for ``MoESubmodules.router``: SparseMixer-v2 routers with ``jitter_eps``.

    Raises ConfigError (a ValueError) naming ``jitter_eps`` unless it is finite and > 0.
    """
    try:
        jitter_eps = sparsemixer.validate_jitter_eps(jitter_eps)
    except ValueError as error:
        raise ConfigError(f"sparsemixer_router_builder: {error}") from None
    return functools.partial(SparseMixerRouter, jitter_eps=jitter_eps)


def router_builder_for(model, regularizer=None):
    """The registry's builder (``router_registry``): SparseMixer-v2 with ``model``'s options."""
    return sparsemixer_router_builder(model.router_options.jitter_eps)
