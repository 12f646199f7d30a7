"""``ReLURouter``: ReMoE's router as a megatron-core Router, for ``MoESubmodules.router``.

Shape suffixes: T = tokens this rank routes, E = experts.

The router returns what megatron-core's dropless token dispatchers expect: ``probs_TE`` (the ReLU
gates, zero where inactive) and ``routing_map_TE`` (gate > 0). During training the gates' backward
adds the gradient of ``l1_coeff * L_reg_l / num_moe_layers``, scaled like the LM loss's gradient
over micro-batches (the scale megatron's ``MoEAuxLossAutoScaler`` holds for its aux losses), so the
LM loss it reports is unchanged; and it records the layer's reg loss and expert counts in the
regularizer, the one owner of the step's routing statistics (not megatron's global aux-loss
tracker).

Tokens: with sequence or context parallelism a rank routes only part of the layer's tokens.
Expert counts are summed over the tensor-and-context-parallel group, exactly as megatron-core
does for its own aux loss, so ``f_e`` and the sparsity are those of all the layer's tokens; each
rank's reg loss is its share of the layer's, and the shares add up.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import Router
from megatron.core.transformer.transformer_config import TransformerConfig

from remoe_patches.routing import relu_gates
from remoe_patches.routing.regularizer import AdaptiveL1, reg_loss_gradient


ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
"""``--moe-router-dtype`` values; None computes in the input's dtype."""


def num_moe_layers(config: TransformerConfig) -> int:
    """How many of the model's layers are MoE layers (megatron's ``moe_layer_freq`` rule)."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return sum(1 for i in range(config.num_layers) if i % freq == 0)
    return sum(freq)


def target_sparsity(num_experts: int, topk: int) -> float:
    """``1 - k/E``: the sparsity of a TopK router with the same active experts per token."""
    return 1.0 - topk / num_experts


class ReLURouter(Router):
    """ReLU routing (spec Eq. 5) with the adaptive, load-balanced L1 regularizer (Eq. 6-11).

    Args:
        config: the model's TransformerConfig; ``moe_router_topk`` only sets the target sparsity.
        pg_collection: megatron-core process groups (given by MoELayer).
        regularizer: the model-wide adaptive coefficient, shared by every MoE layer.
        load_balancing: Eq. 10 (True) or the plain L1 of Eq. 9 (False).
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection=None,
        *,
        regularizer: AdaptiveL1,
        load_balancing: bool = True,
    ):
        super().__init__(config=config, pg_collection=pg_collection)
        self.topk = config.moe_router_topk
        self.regularizer = regularizer
        self.load_balancing = load_balancing
        self.num_moe_layers = num_moe_layers(config)

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if padding_mask is not None:
            raise NotImplementedError(
                "ReLURouter does not support padding masks: pretraining sequences are unpadded"
            )
        logits = self.gating(input)
        return self.routing(logits)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """The logits ``x W_r^T``: a plain GEMM in the router dtype. megatron's gating goes through
        a custom autograd function whose Python overhead was ~15% of the router's step time on CPU;
        it pays only with transformer-engine's GEMM, which is kept when installed."""
        if moe_utils.te_general_gemm is not None:
            return super().gating(input)
        dtype = ROUTER_DTYPES.get(self.config.moe_router_dtype, input.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(input.to(dtype), self.weight.to(dtype), bias)

    def routing(self, logits: torch.Tensor):
        logits_TE = logits.view(-1, self.num_experts)
        # Like megatron's aux loss: only where a backward follows (so not in evaluation, nor in
        # the no-grad first pass of activation recomputation, which would count twice).
        if self.training and torch.is_grad_enabled():
            return self._routing_with_regularizer(logits_TE)
        gates_TE = relu_gates.relu_gates(logits_TE)
        return gates_TE, relu_gates.active_mask(gates_TE)

    def _routing_with_regularizer(self, logits_TE):
        """The gates, whose backward adds ``l1_coeff * dL_reg/dR / num_moe_layers`` (the loss is
        linear in the gates), scaled like the LM loss's gradient as megatron's aux losses are."""
        routing_map_TE = relu_gates.active_mask(logits_TE)  # ReLU keeps the sign
        local_num_tokens = logits_TE.shape[0]
        replicas = self.tp_cp_group.size()
        num_tokens = local_num_tokens * replicas
        tokens_per_expert_E = routing_map_TE.sum(dim=0, dtype=torch.float32)
        if replicas > 1:  # (an autograd function's overhead for nothing on one rank)
            tokens_per_expert_E = reduce_from_tensor_model_parallel_region(
                tokens_per_expert_E, self.tp_cp_group
            )
        reg_grad_E = reg_loss_gradient(
            tokens_per_expert_E, num_tokens, self.topk, self.load_balancing
        )

        # The model's L_reg is the mean over MoE layers (spec Eq. 9/10 with their 1/L).
        weight = self.regularizer.l1_coeff / self.num_moe_layers
        if self.calculate_per_token_loss:
            # megatron then divides every gradient by the token count; undo it as its aux loss does.
            weight = weight * local_num_tokens
        gates_TE = relu_gates.relu_gates_with_penalty(
            logits_TE, reg_grad_E * weight, _main_loss_backward_scale
        )

        if self.layer_number is not None:
            # L_reg = sum_te g_e R_te: this rank's share, for the log
            gate_sums_E = gates_TE.detach().sum(dim=0, dtype=torch.float32)
            reg_loss = torch.dot(gate_sums_E, reg_grad_E.float())
            self.regularizer.record(
                self.layer_number,
                reg_loss=reg_loss,
                tokens_per_expert_E=tokens_per_expert_E,
                num_tokens=num_tokens,
                replicas=replicas,
            )
        return gates_TE, routing_map_TE


def _main_loss_backward_scale():
    """The scale megatron's schedule gives the LM loss's gradient (and its aux losses')."""
    return MoEAuxLossAutoScaler.main_loss_backward_scale


def relu_router_builder(regularizer: AdaptiveL1, load_balancing: bool = True):
    """A RouterBuilder for ``MoESubmodules.router`` whose routers share ``regularizer``."""
    return functools.partial(ReLURouter, regularizer=regularizer, load_balancing=load_balancing)


def router_builder_for(model, regularizer: Optional[AdaptiveL1]):
    """The registry's builder (``router_registry``): ReLU routers of ``model`` (a ModelConfig)
    sharing the model-wide ``regularizer``."""
    if regularizer is None:
        raise ValueError("ReLU routing needs its AdaptiveL1 regularizer (model.build_regularizer)")
    return relu_router_builder(regularizer, model.router_options.load_balancing)
