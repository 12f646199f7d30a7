"""The adaptive L1 coefficient of ReMoE (spec Eq. 7/8) and the step's sparsity reduction.

Shape suffixes: L = all transformer layers of the model (MoE or not; indexed by layer number - 1),
E = experts.

Each ReLU router calls ``record`` once per micro-batch it trains on, with its layer's sparsity
(already reduced over the tokens the layer sees). After the optimizer step the training loop
calls ``finish_step`` (or ``step_sparsity`` then ``update``): the per-layer values are averaged
over micro-batches, data-parallel ranks and pipeline stages, then over MoE layers, and the
coefficient moves by ``multiplier ** sign(target - sparsity)``.

Everything stays on the device: no ``.item()``, ``.tolist()``, ``bool(tensor)`` or ``.cpu()``,
so the host never waits for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class ExpertLoad:
    """Share of each layer's tokens routed to each expert, over a window of steps."""

    fraction_LE: torch.Tensor
    """NaN rows for layers that are not MoE (or saw no tokens)."""


@dataclass
class StepSparsity:
    """The step's sparsity: ``mean`` over MoE layers and ``per_layer_L`` (NaN for non-MoE layers)."""

    mean: torch.Tensor
    per_layer_L: torch.Tensor


class AdaptiveL1:
    """The coefficient ``lambda`` of ``L = L_lm + lambda * L_reg`` and its per-step update.

    Args:
        target_sparsity: ``1 - k/E``, the sparsity the coefficient steers towards.
        num_layers: transformer layers of the whole model (all pipeline stages).
        num_experts: experts per MoE layer (for the expert-load statistics).
        init_coeff: ``lambda_0``.
        multiplier: ``alpha`` > 1; ``lambda *= alpha`` while too dense, ``/= alpha`` otherwise
            (a step exactly at the target divides, as in the authors' code).
        device: where ``coeff`` and the accumulators live (the model's device).
    """

    def __init__(
        self,
        target_sparsity: float,
        num_layers: int,
        num_experts: int = 1,
        init_coeff: float = 1e-8,
        multiplier: float = 1.2,
        device: Optional[torch.device | str] = None,
    ):
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"AdaptiveL1.target_sparsity={target_sparsity} must be in [0, 1)")
        if multiplier <= 1.0:
            raise ValueError(f"AdaptiveL1.multiplier={multiplier} must be > 1")
        if init_coeff <= 0.0:
            raise ValueError(f"AdaptiveL1.init_coeff={init_coeff} must be > 0")
        self.target_sparsity = float(target_sparsity)
        self.multiplier = float(multiplier)
        self.num_layers = int(num_layers)
        self.coeff = torch.tensor(init_coeff, dtype=torch.float32, device=device)
        # Row 0: summed sparsity, row 1: number of records, per layer.
        self._records_2L = torch.zeros(2, self.num_layers, dtype=torch.float32, device=device)
        # Tokens routed to each expert and tokens seen, per layer, until ``take_expert_load``.
        self._load_LE = torch.zeros(self.num_layers, num_experts, dtype=torch.float32, device=device)
        self._tokens_L = torch.zeros(self.num_layers, dtype=torch.float32, device=device)

    @property
    def device(self) -> torch.device:
        return self.coeff.device

    def to(self, device: torch.device | str) -> "AdaptiveL1":
        self.coeff = self.coeff.to(device)
        self._records_2L = self._records_2L.to(device)
        self._load_LE = self._load_LE.to(device)
        self._tokens_L = self._tokens_L.to(device)
        return self

    def record(
        self,
        layer_number: int,
        layer_sparsity: torch.Tensor,
        tokens_per_expert_E: Optional[torch.Tensor] = None,
        num_tokens: int = 0,
    ) -> None:
        """Add one micro-batch of MoE layer ``layer_number`` (1-based, global): its sparsity and,
        optionally, how many of its ``num_tokens`` tokens each expert received."""
        index = layer_number - 1
        self._records_2L[0, index] += layer_sparsity.detach().float()
        self._records_2L[1, index] += 1.0
        if tokens_per_expert_E is not None:
            self._load_LE[index] += tokens_per_expert_E.detach().float()
            self._tokens_L[index] += num_tokens

    def take_expert_load(
        self,
        *,
        data_parallel_group: Optional[dist.ProcessGroup] = None,
        pipeline_parallel_group: Optional[dist.ProcessGroup] = None,
    ) -> ExpertLoad:
        """The expert load since the last call, over all ranks; resets the window."""
        load_LE = torch.cat([self._load_LE, self._tokens_L[:, None]], dim=1)
        self._load_LE.zero_()
        self._tokens_L.zero_()
        _sum_over(load_LE, pipeline_parallel_group, data_parallel_group)
        tokens_L = load_LE[:, -1:]
        fraction_LE = torch.where(tokens_L > 0, load_LE[:, :-1] / tokens_L.clamp(min=1.0), torch.nan)
        return ExpertLoad(fraction_LE=fraction_LE)

    def step_sparsity(
        self,
        *,
        data_parallel_group: Optional[dist.ProcessGroup] = None,
        pipeline_parallel_group: Optional[dist.ProcessGroup] = None,
    ) -> StepSparsity:
        """Average the recorded values over micro-batches, DP ranks and PP stages, then reset.

        Layers on other pipeline stages hold zeros here, so one sum over both groups gives every
        layer's total and its number of records; their ratio is the mean over micro-batches and
        data-parallel ranks.
        """
        records_2L = self._records_2L.clone()
        self._records_2L.zero_()
        _sum_over(records_2L, pipeline_parallel_group, data_parallel_group)
        summed_L, count_L = records_2L
        is_moe_L = count_L > 0
        per_layer_L = torch.where(is_moe_L, summed_L / count_L.clamp(min=1.0), torch.nan)
        mean = torch.where(is_moe_L, per_layer_L, 0.0).sum() / is_moe_L.sum().clamp(min=1)
        return StepSparsity(mean=mean, per_layer_L=per_layer_L)

    def update(self, sparsity: torch.Tensor) -> None:
        """Eq. 7: ``lambda *= alpha`` when sparsity < target, else ``lambda /= alpha``."""
        too_dense = sparsity.to(self.coeff.device) < self.target_sparsity
        factor = torch.where(too_dense, self.multiplier, 1.0 / self.multiplier)
        # A new tensor, not an in-place update: graphs still waiting for their backward saved
        # the old value.
        self.coeff = self.coeff * factor.to(self.coeff.dtype)

    def finish_step(
        self,
        *,
        data_parallel_group: Optional[dist.ProcessGroup] = None,
        pipeline_parallel_group: Optional[dist.ProcessGroup] = None,
    ) -> StepSparsity:
        """After an optimizer step: reduce the step's sparsity and update the coefficient."""
        step = self.step_sparsity(
            data_parallel_group=data_parallel_group,
            pipeline_parallel_group=pipeline_parallel_group,
        )
        self.update(step.mean)
        return step

    def state_dict(self) -> dict:
        return {
            "coeff": self.coeff.detach().clone(),
            "multiplier": self.multiplier,
            "target_sparsity": self.target_sparsity,
        }

    def load_state_dict(self, state: dict) -> None:
        self.coeff = torch.as_tensor(state["coeff"], dtype=torch.float32).to(self.device).clone()
        self.multiplier = float(state["multiplier"])
        self.target_sparsity = float(state["target_sparsity"])


def _sum_over(tensor: torch.Tensor, *groups: Optional[dist.ProcessGroup]) -> None:
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(tensor, group=group)
