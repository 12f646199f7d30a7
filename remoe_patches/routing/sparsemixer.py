"""SparseMixer-v2 routing (GRIN, arXiv 2409.12136; SparseMixer, arXiv 2310.00811) in plain torch.

Shape suffixes: T = tokens, E = experts, K = experts picked per token (1 or 2); a tensor with no
suffix is 0-dim.

SparseMixer-v2 is a TopK router whose forward SAMPLES the expert during training and whose
backward replaces the gating gradient with GRIN's estimator. Per token with router logits ``s``
(``scores`` in the reference) and ``r = jitter_eps``, pass ``j`` (j = 1, then j = 2 for k = 2)
over the candidate experts ``C_j`` (``C_1`` = all experts, ``C_2`` = all but ``z_1``):

1. Jitter mask (``mask_logits_threshold``)::

       m = max_{e in C_j} s_e
       keep_e = e in C_j  and  (m - s_e) / max(|s_e|, m) <= 2 r

   roughly the experts that a multiplicative jitter in ``[1 - r, 1 + r]`` on the logits could
   make the top one.
2. Masked softmax (``masked_gates``): ``pi_e = exp(s_e) / sum_{e' kept} exp(s_e')`` over the
   kept experts, 0 elsewhere.
3. Choice (``selected_experts``): training samples ``z ~ Categorical(pi)`` by the Gumbel-max
   trick, ``z = argmax_e (s_e - log eps_e)`` with ``eps_e ~ Exp(1)`` over the kept experts;
   evaluation takes ``z = argmax_{e in C_j} s_e``.
4. Gate (``multiplier``). Evaluation: ``pi_z``, with its true gradient. Training::

       omega = 1  if z = argmax_e pi_e  or  u > 3/4 (u ~ U[0, 1))      (``mask_for_one``)
       gate  = pi_z * (omega + (1 - omega) / 3)

   so a sampled non-argmax expert is scaled to 1/3 three times in four.
5. Router gradient (the reference's ``mp``/``v2core`` autograd function)::

       dL/ds_e  +=  dL/dgate * pi_z * (delta_{e z} - pi_e)

   the derivative of ``pi_z`` at the sample, NOT multiplied by the forward's 1/3, with nothing
   through the sample itself. The upstream ``dL/dgate`` is taken at the forward's point
   ``x_t = t * pi_z * f_z(input)`` with ``t = 1`` (probability 1/4) or ``t = 1/3`` (3/4), so in
   expectation over ``omega`` the estimator integrates the effect of the expert's output with
   Heun's third-order quadrature, ``L(x) - L(0) ~= x * (1/4 L'(x) + 3/4 L'(x/3))`` (the
   reference's "f(x) - f(0) = .25 f'(x) + .75 f'(x/3.)"). For the argmax expert the forward is
   unscaled and the estimator is the plain gating gradient of the masked softmax.

Reference: ``sparsemixerv2_routing`` and ``v2core`` in microsoft/SparseMixer
``sparsemixer/sparsemixer_v2.py`` (commit 1b41d56a), the same code GRIN-MoE ships as
``sparsemixer``/``mp`` and transformers as ``phimoe.modeling_phimoe.sparsemixer`` /
``PhimoeMultiplier``. Default ``jitter_eps = 0.01``: GRIN-MoE's and Phi-3.5-MoE's
``router_jitter_noise`` (transformers' ``PhimoeConfig`` default); SparseMixer's own classes
default to 0.1.

Randomness: each pass draws ``Exp(1)`` noise [T, E] and then one uniform per token [T], in the
reference's order (its second pass draws the uniform twice and uses the second; we draw it
once: same distribution). ``generator=None`` draws from the device's default generator, which
is what megatron needs: it seeds that generator alike on every tensor-parallel rank (so ranks
that route the same tokens pick the same experts; only the RNG tracker's forks differ per rank),
and its activation recomputation saves and restores it, so a recomputed forward re-draws the
same samples. Tests pass their own ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from remoe_patches.config.router_registry import SPARSEMIXER_TOPK as SUPPORTED_TOPK
from remoe_patches.config.router_registry import SparseMixerOptions

JITTER_EPS_DEFAULT = SparseMixerOptions.jitter_eps
"""``jitter_eps`` of GRIN-MoE / Phi-3.5-MoE (``router_jitter_noise``)."""

HEUN_FULL_STEP_PROBABILITY = 0.25
"""P(omega = 1) for a sampled non-argmax expert: Heun's weight 1/4 on ``L'(x)``."""

HEUN_PARTIAL_SCALE = 1.0 / 3.0
"""The forward's scale when omega = 0: Heun's node ``x/3`` (the reference writes 0.3333)."""


def validate_jitter_eps(jitter_eps: float) -> float:
    """``jitter_eps`` as a float; ValueError naming it unless finite and > 0."""
    if (
        isinstance(jitter_eps, bool)
        or not isinstance(jitter_eps, (int, float))
        or not math.isfinite(jitter_eps)
        or jitter_eps <= 0
    ):
        raise ValueError(
            f"jitter_eps={jitter_eps!r}: must be a finite number > 0 (GRIN uses "
            f"{JITTER_EPS_DEFAULT}); at 0 only the top logit survives the jitter mask, so "
            "pi_z = 1 and the router gets no gradient"
        )
    return float(jitter_eps)


def validate_topk(topk: int) -> int:
    """``topk``; ValueError naming it unless 1 or 2."""
    if isinstance(topk, bool) or topk not in SUPPORTED_TOPK:
        raise ValueError(
            f"topk={topk!r}: SparseMixer-v2 picks 1 or 2 experts per token (one "
            "pass each, as GRIN's reference); use 1 or 2"
        )
    return topk


def compute_dtype(logits_TE: torch.Tensor) -> torch.dtype:
    """At least float32: softmax and the jitter ratios are too coarse in bf16."""
    return torch.promote_types(logits_TE.dtype, torch.float32)


def jitter_keep_mask(
    logits_TE: torch.Tensor, jitter_eps: float, candidates_TE: torch.Tensor | None = None
) -> torch.Tensor:
    """Step 1: ``keep_TE``, the candidates with ``(m - s_e) / max(|s_e|, m) <= 2 jitter_eps``.

    ``m`` is the largest candidate logit (``candidates_TE`` None: all experts). The top
    candidate is always kept (its ratio is 0, or 0/0 = NaN when ``m = 0``, which is not > 2r).
    """
    s_TE = logits_TE.detach()
    candidate_logits_TE = (
        s_TE if candidates_TE is None else s_TE.masked_fill(~candidates_TE, -math.inf)
    )
    top_T1 = candidate_logits_TE.max(dim=-1, keepdim=True).values
    factor_TE = torch.maximum(s_TE.abs(), top_T1)
    keep_TE = ~((top_T1 - s_TE) / factor_TE > 2 * jitter_eps)
    return keep_TE if candidates_TE is None else keep_TE & candidates_TE


def gumbel_max_sample(
    masked_logits_TE: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Step 3, training: ``expert_T ~ Categorical(softmax(masked_logits))`` by Gumbel-max,
    ``argmax_e (s_e - log eps_e)``, ``eps_e ~ Exp(1)``; -inf (masked) experts are never drawn."""
    exponential_TE = torch.empty_like(masked_logits_TE).exponential_(generator=generator)
    # An Exp(1) draw of exactly 0 would give +inf - inf = NaN on a masked expert.
    exponential_TE.clamp_(min=torch.finfo(exponential_TE.dtype).tiny)
    return (masked_logits_TE - exponential_TE.log()).argmax(dim=-1)


def heun_scale(
    expert_T: torch.Tensor,
    masked_probs_TE: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Step 4, training: ``scale_T = omega + (1 - omega) / 3`` with ``omega = 1`` if the sample
    is the argmax of ``pi`` or ``u > 3/4`` (``u ~ U[0, 1)``, one draw per token), else 0."""
    uniform_T = torch.rand(
        expert_T.shape,
        dtype=masked_probs_TE.dtype,
        device=masked_probs_TE.device,
        generator=generator,
    )
    full_step_T = (expert_T == masked_probs_TE.argmax(dim=-1)) | (
        uniform_T > 1.0 - HEUN_FULL_STEP_PROBABILITY
    )
    return torch.where(full_step_T, 1.0, HEUN_PARTIAL_SCALE).to(masked_probs_TE.dtype)


class SparseMixerV2Gate(torch.autograd.Function):
    """Steps 4-5: forward ``gate_T = pi_z * scale_T``; backward, to the logits only,
    ``grad_TE = grad_gate_T * pi_z * (onehot(z) - pi)`` (the reference's ``mp``)."""

    @staticmethod
    def forward(ctx, logits_TE, masked_probs_TE, expert_T, scale_T):
        """``logits_TE`` is an input only so that the estimator's gradient reaches it."""
        chosen_prob_T = masked_probs_TE.gather(-1, expert_T[:, None]).squeeze(-1)
        ctx.save_for_backward(masked_probs_TE, expert_T, chosen_prob_T)
        ctx.logits_dtype = logits_TE.dtype
        return chosen_prob_T * scale_T

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gate_T):
        """Eq. of step 5; no gradient to the probabilities, the sample or the scale."""
        masked_probs_TE, expert_T, chosen_prob_T = ctx.saved_tensors
        weighted_T1 = (grad_gate_T.to(masked_probs_TE.dtype) * chosen_prob_T)[:, None]
        grad_logits_TE = -masked_probs_TE * weighted_T1
        grad_logits_TE.scatter_add_(-1, expert_T[:, None], weighted_T1)
        return grad_logits_TE.to(ctx.logits_dtype), None, None, None


def sparsemixer_v2(
    logits_TE: torch.Tensor,
    *,
    topk: int = 1,
    jitter_eps: float = JITTER_EPS_DEFAULT,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gates_TK, experts_TK)``: steps 1-5 once per picked expert, in the logits' dtype.

    Pass 2 (``topk=2``) repeats them over all experts but the first pick, with ``m`` the
    largest remaining logit; both passes' estimators add up in the logits' gradient. Gates are
    not renormalised across the two picks (as the reference).
    """
    validate_topk(topk)
    validate_jitter_eps(jitter_eps)
    if logits_TE.dim() != 2:
        raise ValueError(f"logits_TE must be [tokens, experts], got shape {tuple(logits_TE.shape)}")
    if topk > logits_TE.shape[-1]:
        raise ValueError(f"topk={topk} exceeds the {logits_TE.shape[-1]} experts")
    work_TE = logits_TE.to(compute_dtype(logits_TE))
    candidates_TE = None
    gates, experts = [], []
    for _ in range(topk):
        keep_TE = jitter_keep_mask(work_TE, jitter_eps, candidates_TE)
        masked_logits_TE = work_TE.masked_fill(~keep_TE, -math.inf)
        if training:
            with torch.no_grad():
                masked_probs_TE = torch.softmax(masked_logits_TE, dim=-1)
                expert_T = gumbel_max_sample(masked_logits_TE, generator)
                scale_T = heun_scale(expert_T, masked_probs_TE, generator)
            gate_T = SparseMixerV2Gate.apply(work_TE, masked_probs_TE, expert_T, scale_T)
        else:
            expert_T = masked_logits_TE.detach().argmax(dim=-1)
            masked_probs_TE = torch.softmax(masked_logits_TE, dim=-1)
            gate_T = masked_probs_TE.gather(-1, expert_T[:, None]).squeeze(-1)
        gates.append(gate_T)
        experts.append(expert_T)
        if candidates_TE is None:
            candidates_TE = torch.ones_like(keep_TE)
        candidates_TE = candidates_TE.scatter(-1, expert_T[:, None], False)
    return torch.stack(gates, dim=-1).to(logits_TE.dtype), torch.stack(experts, dim=-1)


def dense_routing(
    gates_TK: torch.Tensor, experts_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs_TE, routing_map_TE)`` as megatron's dispatchers take them: the gates scattered
    to their experts (0 elsewhere, differentiable in the gates) and the bool map of picks."""
    num_tokens = gates_TK.shape[0]
    probs_TE = gates_TK.new_zeros(num_tokens, num_experts).scatter(-1, experts_TK, gates_TK)
    routing_map_TE = torch.zeros(
        num_tokens, num_experts, dtype=torch.bool, device=gates_TK.device
    ).scatter(-1, experts_TK, True)
    return probs_TE, routing_map_TE
