"""ReMoE's regularizer: the L1 losses (spec Eq. 9-11), the adaptive coefficient (Eq. 7) and the
one owner of the step's routing statistics.

Shape suffixes: T = tokens of a layer's micro-batch, E = experts, L = all transformer layers of
the model (MoE or not; index = layer number - 1), C = the statistics' columns (see ``_COLUMNS``).

Each ReLU router calls ``AdaptiveL1.record`` once per micro-batch it trains on, with its layer's
reg loss and expert counts (which give its sparsity). They accumulate in ONE packed ``L x C``
buffer; after the optimizer step the loop calls ``finish_step``, which sums the buffer over all
ranks in a single collective, turns it into a ``RoutingStats`` (what the log, the lambda update
and the health report read) and moves the coefficient by ``multiplier ** sign(target - sparsity)``.

Losses: every function works on ONE MoE layer. The model-level quantities of the paper average the
per-layer values over the L MoE layers, so the 1/(L*T) of Eq. 9/10 holds exactly:

    L_reg = mean_l reg_l        S = mean_l sparsity_l

(The authors' code sums the per-layer terms without the 1/L; the adaptive coefficient absorbs that
constant, but its values then differ from ours by a factor L.)

Everything stays on the device: no ``.item()``, ``.tolist()``, ``bool(tensor)`` or ``.cpu()``,
so the host never waits for the GPU. Nothing here imports megatron.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from remoe_patches.routing.relu_gates import at_least_fp32, tokens_per_expert


def l1_loss(
    gates_TE: torch.Tensor, *, num_tokens: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 9 for one layer: ``1/T sum_t ||R(x_t)||_1`` (gates are non-negative)."""
    if num_tokens is None:
        num_tokens = gates_TE.shape[0]
    return at_least_fp32(gates_TE).sum() / num_tokens


def load_balance_weights(
    tokens_per_expert_E: torch.Tensor, num_tokens: int | torch.Tensor, topk: int
) -> torch.Tensor:
    """Eq. 11: ``f_e = E/(k T) sum_t 1{R_te > 0}``, a constant (no gradient flows through it)."""
    num_experts = tokens_per_expert_E.shape[-1]
    return (tokens_per_expert_E * (num_experts / (topk * num_tokens))).detach()


def load_balanced_l1_loss(
    gates_TE: torch.Tensor,
    topk: int,
    *,
    tokens_per_expert_E: torch.Tensor | None = None,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 10 for one layer: ``1/T sum_t sum_e f_e R_te``.

    Its gradient with respect to ``R_te`` is ``f_e / T``, so frequently used experts are pushed
    towards zero harder than rarely used ones.
    """
    if tokens_per_expert_E is None:
        tokens_per_expert_E = tokens_per_expert(gates_TE)
    if num_tokens is None:
        num_tokens = gates_TE.shape[0]
    f_E = load_balance_weights(tokens_per_expert_E, num_tokens, topk)
    return (at_least_fp32(gates_TE).sum(dim=0) * f_E).sum() / num_tokens


def reg_loss_gradient(
    tokens_per_expert_E: torch.Tensor,
    num_tokens: int | torch.Tensor,
    topk: int,
    load_balancing: bool = True,
) -> torch.Tensor:
    """``dL_reg/dR_te``, the same for every token: ``f_e/T`` for Eq. 10, ``1/T`` for Eq. 9.

    Both losses are linear in the gates (``f_e`` is a constant), ``L_reg = sum_te g_e R_te`` with
    this ``g_E``, which is how the router applies them (``relu_gates.relu_gates_with_penalty``).
    """
    if load_balancing:
        return load_balance_weights(tokens_per_expert_E, num_tokens, topk) / num_tokens
    return torch.full_like(tokens_per_expert_E, 1.0 / num_tokens).detach()


# Columns of the per-layer statistics buffer. Every column is a sum over ranks and micro-batches;
# the reg loss is weighted by the tokens it averages, so dividing by the tokens column gives the
# mean over micro-batches and ranks, and Eq. 8's sparsity follows from the loads and the tokens.
_TOKENS, _TOKEN_REG_LOSS = 0, 1
_LOAD = 2  # then one column per expert: tokens routed to it
_COLUMNS = ("tokens", "reg_loss x tokens", "load_0..E-1")


@dataclass
class RoutingStats:
    """One step's routing statistics, over every rank and micro-batch. Per-layer tensors hold NaN
    for layers that are not MoE (or live on another pipeline stage and recorded nothing)."""

    sparsity: torch.Tensor
    """Eq. 8 for the model: the mean over MoE layers (0-dim)."""
    sparsity_L: torch.Tensor
    reg_loss_L: torch.Tensor
    """Each layer's L_reg (Eq. 9 or 10), averaged over micro-batches and data-parallel ranks."""
    expert_load_LE: torch.Tensor
    """Each expert's share of its layer's tokens."""
    l1_coeff: torch.Tensor
    """The lambda this step trained with (before the update)."""


class AdaptiveL1:
    """The coefficient ``lambda`` of ``L = L_lm + lambda * L_reg``, its per-step update, and the
    step's routing statistics.

    Args:
        target_sparsity: ``1 - k/E``, the sparsity the coefficient steers towards.
        num_layers: transformer layers of the whole model (all pipeline stages).
        num_experts: experts per MoE layer (for the expert-load statistics).
        l1_coeff_init: ``lambda_0``.
        multiplier: ``alpha`` > 1; ``lambda *= alpha`` while too dense, ``/= alpha`` otherwise
            (a step exactly at the target divides, as in the authors' code).
        device: where ``l1_coeff`` and the statistics live (the model's device).
    """

    def __init__(
        self,
        target_sparsity: float,
        num_layers: int,
        num_experts: int = 1,
        l1_coeff_init: float = 1e-8,
        multiplier: float = 1.2,
        device: Optional[torch.device | str] = None,
    ):
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"AdaptiveL1.target_sparsity={target_sparsity} must be in [0, 1)")
        if multiplier <= 1.0:
            raise ValueError(f"AdaptiveL1.multiplier={multiplier} must be > 1")
        if l1_coeff_init <= 0.0:
            raise ValueError(f"AdaptiveL1.l1_coeff_init={l1_coeff_init} must be > 0")
        self.target_sparsity = float(target_sparsity)
        self.multiplier = float(multiplier)
        self.num_layers = int(num_layers)
        self.num_experts = int(num_experts)
        self.l1_coeff = torch.tensor(l1_coeff_init, dtype=torch.float32, device=device)
        self._stats_LC = torch.zeros(
            self.num_layers, _LOAD + self.num_experts, dtype=torch.float32, device=device
        )

    @property
    def device(self) -> torch.device:
        return self.l1_coeff.device

    def to(self, device: torch.device | str) -> "AdaptiveL1":
        self.l1_coeff = self.l1_coeff.to(device)
        self._stats_LC = self._stats_LC.to(device)
        return self

    def record(
        self,
        layer_number: int,
        *,
        reg_loss: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        num_tokens: int,
        replicas: int = 1,
    ) -> None:
        """Add one micro-batch of MoE layer ``layer_number`` (1-based, global) of ``num_tokens``
        tokens, ``tokens_per_expert_E`` of which went to each expert.

        ``reg_loss`` is this rank's share of the layer's loss (shares add up over the ranks that
        split the layer's tokens). The counts are the same on each of the ``replicas`` ranks that
        split the tokens (they were reduced over them), so they are weighted ``1/replicas``:
        summed over all ranks, each micro-batch counts once.
        """
        # One addition to the layer's row (this runs per layer and micro-batch); a filled tensor,
        # not torch.tensor(), so that nothing is copied from the host.
        tokens = torch.full((1,), num_tokens / replicas, device=self.device)
        token_reg_loss = (reg_loss.detach() * num_tokens).view(1).to(torch.float32)
        load_E = tokens_per_expert_E if replicas == 1 else tokens_per_expert_E / replicas
        self._stats_LC[layer_number - 1].add_(torch.cat((tokens, token_reg_loss, load_E)))

    def finish_step(
        self, *, group: Optional[dist.ProcessGroup] = None, update: bool = True
    ) -> RoutingStats:
        """Reduce the step's statistics over ``group`` (default: all ranks), reset them and, with
        ``update``, move the coefficient (Eq. 7) by the step's mean sparsity.

        Layers on other pipeline stages hold zeros here, so one sum over all ranks gives every
        layer's totals; their ratios to the layer's tokens are means over micro-batches and
        data-parallel ranks.
        """
        stats_LC = self._stats_LC.clone()
        self._stats_LC.zero_()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(stats_LC, group=group)
        tokens_L = stats_LC[:, _TOKENS]
        is_moe_L = tokens_L > 0
        tokens_L1 = tokens_L.clamp(min=1.0).unsqueeze(1)
        expert_load_LE = torch.where(
            is_moe_L.unsqueeze(1), stats_LC[:, _LOAD:] / tokens_L1, torch.nan
        )
        # Eq. 8: the share of zero gates, 1 - (active pairs) / (tokens x experts)
        sparsity_L = 1.0 - expert_load_LE.sum(dim=1) / self.num_experts
        sparsity = torch.where(is_moe_L, sparsity_L, 0.0).sum() / is_moe_L.sum().clamp(min=1)
        stats = RoutingStats(
            sparsity=sparsity,
            sparsity_L=sparsity_L,
            reg_loss_L=torch.where(
                is_moe_L, stats_LC[:, _TOKEN_REG_LOSS] / tokens_L1[:, 0], torch.nan
            ),
            expert_load_LE=expert_load_LE,
            l1_coeff=self.l1_coeff,
        )
        if update:
            self.update(sparsity)
        return stats

    def update(self, sparsity: torch.Tensor) -> None:
        """Eq. 7: ``lambda *= alpha`` when sparsity < target, else ``lambda /= alpha``."""
        too_dense = sparsity.to(self.l1_coeff.device) < self.target_sparsity
        factor = torch.where(too_dense, self.multiplier, 1.0 / self.multiplier)
        # A new tensor, not an in-place update: graphs still waiting for their backward saved
        # the old value (and RoutingStats.l1_coeff keeps the one the step used).
        self.l1_coeff = self.l1_coeff * factor.to(self.l1_coeff.dtype)

    def state_dict(self) -> dict:
        return {
            "l1_coeff": self.l1_coeff.detach().clone(),
            "multiplier": self.multiplier,
            "target_sparsity": self.target_sparsity,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s state; checkpoints written before the rename hold ``coeff``."""
        l1_coeff = state["l1_coeff"] if "l1_coeff" in state else state["coeff"]
        self.l1_coeff = torch.as_tensor(l1_coeff, dtype=torch.float32).to(self.device).clone()
        self.multiplier = float(state["multiplier"])
        self.target_sparsity = float(state["target_sparsity"])
