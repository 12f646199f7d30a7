"""ReLU routing math of ReMoE (arXiv 2412.14711, spec §1), in plain torch.

Shape suffixes: T = tokens of the layer's (micro)batch, E = experts; a tensor with no suffix is 0-dim.

Every function works on ONE MoE layer. The model-level quantities of the paper average these
per-layer values over the L MoE layers, so the 1/(L*T) of Eq. 9/10 holds exactly:

    L_reg = mean_l reg_l        S = mean_l sparsity_l

(The authors' code sums the per-layer terms without the 1/L; the adaptive coefficient absorbs that
constant, but its values then differ from ours by a factor L.)

The optional ``tokens_per_expert_E``/``num_tokens`` arguments let a layer that sees only part of
its tokens (tensor, sequence or context parallelism) use counts reduced over all of them; by
default they are computed from ``gates_TE`` itself.
"""

from __future__ import annotations

import torch


def relu_gates(logits_TE: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ``R(x) = ReLU(x W)``. No softmax and no normalisation: a token may use 0..E experts."""
    return torch.relu(logits_TE)


def active_mask(gates_TE: torch.Tensor) -> torch.Tensor:
    """Which (token, expert) pairs are routed: the gate is strictly positive."""
    return gates_TE > 0


def tokens_per_expert(gates_TE: torch.Tensor) -> torch.Tensor:
    """Number of tokens each expert receives, as float (it feeds ratios, never indexing)."""
    return active_mask(gates_TE).sum(dim=0, dtype=_accumulation_dtype(gates_TE))


def sparsity(
    gates_TE: torch.Tensor,
    *,
    tokens_per_expert_E: torch.Tensor | None = None,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 8 for one layer: the share of zero gates, ``1 - 1/(T E) sum_t sum_e 1{R_te > 0}``."""
    if tokens_per_expert_E is None:
        tokens_per_expert_E = tokens_per_expert(gates_TE)
    if num_tokens is None:
        num_tokens = gates_TE.shape[0]
    num_experts = gates_TE.shape[-1]
    return 1.0 - tokens_per_expert_E.sum() / (num_tokens * num_experts)


def l1_loss(gates_TE: torch.Tensor, *, num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 9 for one layer: ``1/T sum_t ||R(x_t)||_1`` (gates are non-negative)."""
    if num_tokens is None:
        num_tokens = gates_TE.shape[0]
    return _at_least_fp32(gates_TE).sum() / num_tokens


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
    return (_at_least_fp32(gates_TE).sum(dim=0) * f_E).sum() / num_tokens


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    # Sums over many bf16 gates lose precision; float64 (gradcheck) stays float64.
    return torch.promote_types(x.dtype, torch.float32)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(_accumulation_dtype(x))
