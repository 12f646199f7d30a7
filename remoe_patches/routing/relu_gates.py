"""ReMoE's ReLU gates and their sparsity (arXiv 2412.14711, spec Eq. 5 and 8), in plain torch.

Shape suffixes: T = tokens of the layer's (micro)batch, E = experts; a tensor with no suffix is
0-dim.

Every function works on ONE MoE layer; the model's sparsity is the mean over MoE layers
(``regularizer.py`` takes it, with the L1 losses these gates feed). The optional
``tokens_per_expert_E``/``num_tokens`` arguments let a layer that sees only part of its tokens
(tensor, sequence or context parallelism) use counts reduced over all of them; by default they
are computed from ``gates_TE`` itself.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch


def relu_gates(logits_TE: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ``R(x) = ReLU(x W)``. No softmax and no normalisation: a token may use 0..E
    experts."""
    return torch.relu(logits_TE)


def relu_gates_with_penalty(
    logits_TE: torch.Tensor,
    penalty_grad_E: torch.Tensor,
    grad_scale: Callable[[], Optional[torch.Tensor]] = lambda: None,
) -> torch.Tensor:
    """Eq. 5 whose backward also carries the gradient of a penalty linear in the gates,
    ``P = sum_t sum_e p_e R_te`` (``penalty_grad_E`` = p_E):
    ``dlogits_te = (dR_te + s p_e) 1{R_te > 0}``.

    The L1 losses of Eq. 9/10 are such penalties (``regularizer.reg_loss_gradient``). This gives
    the same gradient as ``relu_gates`` followed by autograd through the penalty (what
    ``loss + P`` would do), through one hook on the gates instead of the loss's autograd nodes,
    which were most of a small router's time. ``grad_scale()`` (read in the backward pass; None
    means 1) is the scale the LM loss's gradient carries, e.g. 1/micro-batches.
    """
    gates_TE = torch.relu(logits_TE)
    if gates_TE.requires_grad:
        # ReLU's backward then keeps the sum only where the gate is positive.
        gates_TE.register_hook(functools.partial(_add_penalty_grad, penalty_grad_E, grad_scale))
    return gates_TE


def _add_penalty_grad(penalty_grad_E, grad_scale, grad_gates_TE):
    scale = grad_scale()
    if scale is not None:
        penalty_grad_E = penalty_grad_E * scale
    return grad_gates_TE + penalty_grad_E.to(grad_gates_TE.dtype)


def active_mask(gates_TE: torch.Tensor) -> torch.Tensor:
    """Which (token, expert) pairs are routed: the gate is strictly positive."""
    return gates_TE > 0


def tokens_per_expert(gates_TE: torch.Tensor) -> torch.Tensor:
    """Number of tokens each expert receives, as float (it feeds ratios, never indexing)."""
    return active_mask(gates_TE).sum(dim=0, dtype=accumulation_dtype(gates_TE))


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


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    # Sums over many bf16 gates lose precision; float64 (gradcheck) stays float64.
    return torch.promote_types(x.dtype, torch.float32)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(accumulation_dtype(x))
