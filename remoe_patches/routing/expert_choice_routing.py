"""Expert Choice routing (Zhou et al. 2022, arXiv 2202.09368), a baseline of the paper's Table 2,
in plain torch: each expert picks its tokens.

Shape suffixes: S = sequence positions, B = sequences of the micro-batch, E = experts,
G = routing groups, N = tokens of one group; a tensor with no suffix is 0-dim.

The megatron router that uses these functions is ``model/routers/expert_choice_router.py``;
nothing here imports megatron.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

# The options' values live with the options (router_registry, torch-free).
from remoe_patches.config.router_registry import EXPERT_CHOICE_GROUPS

ExpertChoiceGroup = Literal["sequence", "batch"]


def expert_choice_capacity(
    num_group_tokens: int, num_experts: int, topk: int, capacity_factor: float
) -> int:
    """C: how many tokens each expert takes from a group of ``num_group_tokens`` tokens.

    ``round(capacity_factor * N * k / E)`` (halves round up), at least 1 and at most N, so on
    average a token gets ``capacity_factor * k`` experts, as a TopK-k router's tokens do at 1.0.
    """
    capacity = math.floor(capacity_factor * num_group_tokens * topk / num_experts + 0.5)
    return max(1, min(num_group_tokens, capacity))


def expert_choice_routing(
    logits_SBE: torch.Tensor,
    *,
    topk: int,
    capacity_factor: float = 1.0,
    group: ExpertChoiceGroup = "sequence",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gates_TE, routing_map_TE)`` of Expert Choice routing, in fp32 (fp64 stays fp64).

    Scores are the softmax over experts of the logits; every expert takes the C tokens of each
    group with its highest scores (``expert_choice_capacity``); a chosen pair's gate is its
    score, every other gate is 0, so a token may get 0..E experts. ``group="sequence"``: a group
    is one sequence (the s positions of one b); ``group="batch"``: all S*B tokens. Rows come
    back in megatron's s-major token order.
    """
    if group not in EXPERT_CHOICE_GROUPS:
        raise ValueError(f"group must be one of {EXPERT_CHOICE_GROUPS}, got {group!r}")
    seq_length, batch_size, num_experts = logits_SBE.shape
    scores_SBE = torch.softmax(
        logits_SBE.to(torch.promote_types(logits_SBE.dtype, torch.float32)), dim=-1
    )
    if group == "sequence":
        scores_GNE = scores_SBE.transpose(0, 1)
    else:
        scores_GNE = scores_SBE.reshape(1, seq_length * batch_size, num_experts)
    capacity = expert_choice_capacity(scores_GNE.shape[1], num_experts, topk, capacity_factor)
    # topk over the token dim picks, per group and expert, the C tokens with the highest scores.
    chosen_index_GCE = torch.topk(scores_GNE.detach(), capacity, dim=1).indices
    routing_map_GNE = torch.zeros_like(scores_GNE, dtype=torch.bool)
    routing_map_GNE.scatter_(1, chosen_index_GCE, True)
    gates_GNE = scores_GNE * routing_map_GNE
    if group == "sequence":
        gates_SBE, routing_map_SBE = gates_GNE.transpose(0, 1), routing_map_GNE.transpose(0, 1)
    else:
        gates_SBE, routing_map_SBE = gates_GNE, routing_map_GNE
    num_tokens = seq_length * batch_size
    return (
        gates_SBE.reshape(num_tokens, num_experts),
        routing_map_SBE.reshape(num_tokens, num_experts),
    )
