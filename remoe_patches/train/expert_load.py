"""Each MoE layer's tokens per expert, for every router kind: what the logs report as expert
shares, their spread, and dead experts.

Shape suffixes: L = all transformer layers (index = layer number - 1), E = experts, C = the
buffer's columns (tokens, tokens routed to no expert, then one per expert).

The counts come from what the router hands megatron's token dispatcher, its ``routing_map_TE``
(a forward hook on every megatron-core ``Router``: TopK, ReLU, Hash, Expert Choice,
SparseMixer), or for Lory, whose experts are merged rather than dispatched, from each segment's
routing weights (an expert's "tokens" are then its weight summed over tokens). Only forwards
that train count (not evaluation, nor the no-grad first pass of activation recomputation).

The counts accumulate on the device over a log window and are reduced over all ranks once, when
the window is logged: no host sync and no collective per step. Every rank adds the tokens it
routed; where tensor-parallel ranks route the same tokens, numerator and denominator are both
counted on each of them, so the shares are exact either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

_TOKENS, _UNROUTED, _LOAD = 0, 1, 2


@dataclass
class ExpertShares:
    """A log window's routing, over every rank and micro-batch. Rows of layers that are not MoE
    (or routed nothing in the window, like Lory's dense warm-up) are NaN."""

    share_LE: torch.Tensor
    """Each expert's tokens over its layer's tokens (a row sums to the mean experts per token)."""
    unrouted_L: torch.Tensor
    """The share of the layer's tokens that no expert took (ReLU routing, Expert Choice)."""

    @property
    def moe_layers(self) -> list:
        """Layers (numbered from 1) with counts."""
        return [
            layer + 1 for layer in torch.nonzero(~torch.isnan(self.unrouted_L)).flatten().tolist()
        ]

    def per_layer(self) -> dict:
        """Each MoE layer's summaries, as lists over ``moe_layers``."""
        rows = [layer - 1 for layer in self.moe_layers]
        share_ME = self.share_LE[rows].double()
        mean_M = share_ME.mean(dim=1)
        return dict(
            expert_share=share_ME.tolist(),
            expert_share_min=share_ME.min(dim=1).values.tolist(),
            expert_share_max=share_ME.max(dim=1).values.tolist(),
            # the coefficient of variation over the layer's experts: 0 when perfectly balanced
            expert_share_cv=(
                share_ME.std(dim=1, unbiased=False) / mean_M.clamp(min=1e-12)
            ).tolist(),
            experts_per_token=share_ME.sum(dim=1).tolist(),
            tokens_without_expert=self.unrouted_L[rows].double().tolist(),
        )


class ExpertLoad:
    """The window's tokens per expert of every MoE layer.

    Args:
        num_layers: transformer layers of the whole model (all pipeline stages).
        num_experts: experts per MoE layer.
        device: where the counts accumulate (the model's device).
    """

    def __init__(
        self, num_layers: int, num_experts: int, device: Optional[torch.device | str] = None
    ):
        self.num_experts = int(num_experts)
        self._counts_LC = torch.zeros(
            num_layers, _LOAD + self.num_experts, dtype=torch.float32, device=device
        )

    def record(
        self,
        layer_number: int,
        tokens_per_expert_E: torch.Tensor,
        unrouted_tokens: torch.Tensor,
        num_tokens: int,
    ) -> None:
        """Add ``num_tokens`` tokens of layer ``layer_number`` (from 1), ``unrouted_tokens`` of
        which no expert took, and how many (or how much weight) went to each expert."""
        row = torch.cat(
            (
                torch.full((1,), float(num_tokens), device=self._counts_LC.device),
                unrouted_tokens.detach().float().view(1),
                tokens_per_expert_E.detach().float(),
            )
        )
        self._counts_LC[layer_number - 1].add_(row)

    def record_routing_map(self, layer_number: int, routing_map_TE: torch.Tensor) -> None:
        """One micro-batch's dispatch: token t goes to expert e where ``routing_map_TE``."""
        routing_map_TE = routing_map_TE.reshape(-1, self.num_experts)
        self.record(
            layer_number,
            routing_map_TE.sum(dim=0, dtype=torch.float32),
            (~routing_map_TE.any(dim=1)).sum(dtype=torch.float32),
            routing_map_TE.shape[0],
        )

    def window(self, group: Optional[dist.ProcessGroup] = None) -> ExpertShares:
        """The counts since the last call, reduced over ``group`` (default: all ranks; every rank
        of it must call), as shares; the counts restart."""
        counts_LC = self._counts_LC.clone()
        self._counts_LC.zero_()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(counts_LC, group=group)
        tokens_L1 = counts_LC[:, _TOKENS : _TOKENS + 1]
        counted_L1 = tokens_L1 > 0
        share_LC = torch.where(counted_L1, counts_LC / tokens_L1.clamp(min=1.0), torch.nan)
        return ExpertShares(share_LE=share_LC[:, _LOAD:], unrouted_L=share_LC[:, _UNROUTED])


def attach(model_chunks: list, load: ExpertLoad) -> list:
    """Count every MoE layer's routing of ``model_chunks`` into ``load``; the hook handles
    (``handle.remove()`` detaches)."""
    from megatron.core.transformer.moe.router import Router

    from remoe_patches.model.routers.lory_layer import LoryMLP

    handles = []
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, Router):
                handles.append(
                    module.register_forward_hook(
                        lambda router, args, output: _count_routing_map(load, router, output)
                    )
                )
            elif isinstance(module, LoryMLP):
                handles.append(module.observe_routing(load.record))
    return handles


def counts_this_forward(module: torch.nn.Module) -> bool:
    """A forward that trains: the one a backward follows (as megatron counts its aux losses)."""
    return module.training and torch.is_grad_enabled() and module.layer_number is not None


def _count_routing_map(load: ExpertLoad, router, output) -> None:
    if counts_this_forward(router):
        _probs_TE, routing_map_TE = output
        load.record_routing_map(router.layer_number, routing_map_TE)
