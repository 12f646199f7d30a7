"""SparseMixer-v2's routing math (remoe_patches/routing/sparsemixer.py) against independent
computations.

The expected values are written out with Python loops over plain floats (here and in
routing_references.py): the jitter mask,
the masked softmax, the Gumbel-max sample and Heun's coin from the same generator draws, and
the router gradient of GRIN's estimator. The released reference (transformers' Phi-3.5-MoE /
GRIN-MoE ``sparsemixer``) is checked too. Finite differences are used only where the estimator
IS a true gradient: in evaluation (the gate is the masked softmax of the argmax) and, in
training with the sample held fixed, for the tokens whose forward is unscaled.
"""

from __future__ import annotations

import math

import pytest
import torch

from remoe_patches.routing.sparsemixer import (
    dense_routing,
    jitter_keep_mask,
    sparsemixer_v2,
)

from routing_references import EPS, kept_experts, masked_softmax

# Rows: several experts within the jitter band of the max (A, C), all-negative logits where the
# ratio's denominator is |s_e| (B), one expert alone in the band (D).
LOGITS = [
    [1.00, 0.995, 0.99, 0.5],
    [-0.200, -0.199, -0.3, -0.198],
    [2.0, 1.97, 1.99, 1.0],
    [0.3, -0.2, -0.199, -0.198],
]
SEED = 10  # its samples cover the three cases of the estimator (asserted below)


def logits(dtype=torch.float64, requires_grad=False):
    return torch.tensor(LOGITS, dtype=dtype, requires_grad=requires_grad)


# ----- independent computations: plain Python over lists --------------------------------------


def argmax(values, among):
    return max(among, key=lambda e: (values[e], -e))


def expected_routing(rows, topk, training, seed=None):
    """(gates, experts, scales, probs per pass) of every token, drawing as documented: per pass
    Exp(1) noise [T, E] then one uniform per token [T], from a generator seeded with ``seed``."""
    num_tokens, num_experts = len(rows), len(rows[0])
    generator = torch.Generator().manual_seed(seed) if training else None
    candidates = [list(range(num_experts)) for _ in rows]
    gates = [[] for _ in rows]
    experts = [[] for _ in rows]
    scales = [[] for _ in rows]
    probs = [[] for _ in rows]
    for _ in range(topk):
        if training:
            exponential = (
                torch.empty(num_tokens, num_experts, dtype=torch.float64)
                .exponential_(generator=generator)
                .tolist()
            )
            uniform = torch.rand(num_tokens, dtype=torch.float64, generator=generator).tolist()
        for t, row in enumerate(rows):
            kept = kept_experts(row, candidates[t])
            pi = masked_softmax(row, kept)
            if training:
                z = max(kept, key=lambda e: row[e] - math.log(exponential[t][e]))
                full_step = z == argmax(pi, kept) or uniform[t] > 0.75
                scale = 1.0 if full_step else 1.0 / 3.0
            else:
                z, scale = argmax(row, candidates[t]), 1.0
            gates[t].append(pi[z] * scale)
            experts[t].append(z)
            scales[t].append(scale)
            probs[t].append(pi)
            candidates[t] = [e for e in candidates[t] if e != z]
    return gates, experts, scales, probs


def estimator_gradient(probs, experts, upstream):
    """GRIN's estimator: d/ds_e = sum over passes of upstream * pi_z * (1{e = z} - pi_e)."""
    grad = [[0.0] * len(probs[0][0]) for _ in probs]
    for t in range(len(probs)):
        for j, z in enumerate(experts[t]):
            pi = probs[t][j]
            for e in range(len(pi)):
                grad[t][e] += upstream[t][j] * pi[z] * ((1.0 if e == z else 0.0) - pi[e])
    return grad


# ----- the jitter mask --------------------------------------------------------------------------


def test_jitter_mask_keeps_the_experts_within_2_eps_of_the_max():
    gen = torch.Generator().manual_seed(0)
    s_TE = torch.cat(
        [
            torch.randn(20, 6, generator=gen, dtype=torch.float64) * 0.02 + 0.5,
            torch.randn(20, 6, generator=gen, dtype=torch.float64) * 0.02 - 0.5,
            torch.randn(20, 6, generator=gen, dtype=torch.float64),
        ]
    )
    candidates_TE = torch.rand(60, 6, generator=gen) > 0.3
    candidates_TE[:, 0] = True
    rows = s_TE.tolist()
    for eps in (0.01, 0.05):
        keep_TE = jitter_keep_mask(s_TE, eps)
        expected = [[e in kept_experts(row, range(6), eps) for e in range(6)] for row in rows]
        assert keep_TE.tolist() == expected
        keep_TE = jitter_keep_mask(s_TE, eps, candidates_TE)
        expected = [
            [
                e in kept_experts(row, [c for c in range(6) if candidates_TE[t, c]], eps)
                for e in range(6)
            ]
            for t, row in enumerate(rows)
        ]
        assert keep_TE.tolist() == expected
    assert 0.0 < jitter_keep_mask(s_TE, 0.01).float().mean() < 1.0  # both outcomes occur


# ----- (a) the forward: choice and gate ----------------------------------------------------------


@pytest.mark.parametrize("topk", [1, 2])
def test_training_forward_matches_the_documented_draws(topk):
    gen = torch.Generator().manual_seed(SEED)
    gates_TK, experts_TK = sparsemixer_v2(logits(), topk=topk, training=True, generator=gen)
    gates, experts, scales, _ = expected_routing(LOGITS, topk, training=True, seed=SEED)
    assert experts_TK.tolist() == experts
    torch.testing.assert_close(gates_TK, torch.tensor(gates, dtype=torch.float64))
    if topk == 1:  # the seed covers: argmax sample, non-argmax at full scale, non-argmax at 1/3
        argmaxes = [row.index(max(row)) for row in LOGITS]
        cases = {(experts[t][0] == argmaxes[t], scales[t][0]) for t in range(3)}
        assert cases == {(True, 1.0), (False, 1.0), (False, 1.0 / 3.0)}


@pytest.mark.parametrize("topk", [1, 2])
def test_evaluation_takes_the_argmax_with_its_masked_softmax_and_draws_nothing(topk):
    state = torch.get_rng_state()
    gates_TK, experts_TK = sparsemixer_v2(logits(), topk=topk, training=False)
    assert torch.equal(torch.get_rng_state(), state)
    gates, experts, _, _ = expected_routing(LOGITS, topk, training=False)
    assert experts_TK.tolist() == experts
    assert experts_TK[:, 0].tolist() == [0, 3, 0, 0]
    torch.testing.assert_close(gates_TK, torch.tensor(gates, dtype=torch.float64))
    assert gates_TK[3, 0] == 1.0  # D: alone in the band, whatever the other logits


def test_samples_follow_the_masked_softmax_and_heuns_coin():
    row = [1.0, 0.995, 0.99, 0.985, 0.5, -1.0]
    num_tokens = 20000
    s_TE = torch.tensor([row] * num_tokens, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    gates_TK, experts_TK = sparsemixer_v2(s_TE, topk=1, training=True, generator=gen)
    pi = masked_softmax(row, kept_experts(row, range(6)))
    assert pi[4] == pi[5] == 0.0
    frequency = torch.bincount(experts_TK[:, 0], minlength=6).double() / num_tokens
    torch.testing.assert_close(frequency, torch.tensor(pi, dtype=torch.float64), atol=0.015, rtol=0)
    chosen_pi_T = torch.tensor(pi, dtype=torch.float64)[experts_TK[:, 0]]
    scale_T = gates_TK[:, 0] / chosen_pi_T
    assert torch.all(scale_T[experts_TK[:, 0] == 0] == 1.0)
    off_argmax_scale_T = scale_T[experts_TK[:, 0] != 0]
    full = torch.isclose(off_argmax_scale_T, torch.tensor(1.0, dtype=torch.float64))
    third = torch.isclose(off_argmax_scale_T, torch.tensor(1 / 3, dtype=torch.float64))
    assert torch.all(full | third)
    assert full.double().mean().item() == pytest.approx(0.25, abs=0.02)


# ----- (b) the router gradient ------------------------------------------------------------------


@pytest.mark.parametrize("topk", [1, 2])
def test_logit_gradient_is_the_sparsemixer_v2_estimator(topk):
    upstream = [[0.7, -1.3][:topk], [1.1, 0.4][:topk], [-0.6, 0.9][:topk], [1.5, -0.8][:topk]]
    s_TE = logits(requires_grad=True)
    gen = torch.Generator().manual_seed(SEED)
    gates_TK, experts_TK = sparsemixer_v2(s_TE, topk=topk, training=True, generator=gen)
    (gates_TK * torch.tensor(upstream, dtype=torch.float64)).sum().backward()

    _, experts, scales, probs = expected_routing(LOGITS, topk, training=True, seed=SEED)
    assert experts_TK.tolist() == experts
    expected = torch.tensor(estimator_gradient(probs, experts, upstream), dtype=torch.float64)
    torch.testing.assert_close(s_TE.grad, expected)
    if topk == 1:
        assert torch.all(s_TE.grad[3] == 0.0)  # D: alone in the band, pi_z = 1

    # Not TopK's gradient: autograd of the same experts' gates in the full softmax.
    straight_TE = logits(requires_grad=True)
    straight_gates_TK = torch.softmax(straight_TE, -1).gather(-1, torch.tensor(experts))
    (straight_gates_TK * torch.tensor(upstream, dtype=torch.float64)).sum().backward()
    assert not torch.allclose(s_TE.grad, straight_TE.grad, atol=1e-3)
    assert straight_TE.grad[3].abs().sum() > 0.1


def test_gradient_and_experts_match_the_released_reference():
    """transformers' ``phimoe.sparsemixer`` (GRIN-MoE's code, top-2) draws from the default
    generator: exp noise, uniform, exp noise, then two uniforms (it redraws with ``uniform_``),
    so from one seed the picks and the gradient agree exactly, the first gate up to the
    reference's 0.3333 for 1/3, and the second gate up to a Heun coin of its own."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer as reference

    gen = torch.Generator().manual_seed(3)
    s_TE = torch.randn(64, 8, generator=gen, dtype=torch.float64) * 0.05 + 1.0
    upstream_TK = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    for training in (True, False):
        ours_TE = s_TE.clone().requires_grad_()
        theirs_TE = s_TE.clone().requires_grad_()
        torch.manual_seed(5)
        their_gates_TK, their_experts_TK = reference(
            theirs_TE, jitter_eps=EPS, training=training, top_k=2
        )
        torch.manual_seed(5)
        gates_TK, experts_TK = sparsemixer_v2(ours_TE, topk=2, jitter_eps=EPS, training=training)
        assert torch.equal(experts_TK, their_experts_TK)
        torch.testing.assert_close(gates_TK[:, 0], their_gates_TK[:, 0], rtol=2e-4, atol=0)
        ratio_T = gates_TK[:, 1] / their_gates_TK[:, 1]
        assert all(min(abs(r - c) for c in (1 / 3, 1.0, 3.0)) < 1e-3 for r in ratio_T.tolist())
        (gates_TK * upstream_TK).sum().backward()
        (their_gates_TK * upstream_TK).sum().backward()
        torch.testing.assert_close(ours_TE.grad, theirs_TE.grad, rtol=1e-12, atol=1e-12)
        if training:
            assert (experts_TK[:, 0] != s_TE.argmax(-1)).sum() > 5  # sampling did happen


def test_estimator_is_the_true_gradient_in_evaluation():
    s_TE = logits(requires_grad=True)
    for topk in (1, 2):
        assert torch.autograd.gradcheck(
            lambda s: sparsemixer_v2(s, topk=topk, training=False)[0], (s_TE,)
        )


def test_in_training_estimator_times_scale_is_the_derivative_with_the_sample_held():
    """With the draws fixed, the gate moves as ``scale * d pi_z``: the estimator equals that
    true derivative where the forward is unscaled and is 3x it where it is scaled to 1/3."""

    def run(s_TE):
        return sparsemixer_v2(
            s_TE, topk=1, training=True, generator=torch.Generator().manual_seed(SEED)
        )

    s_TE = logits(requires_grad=True)
    gates_TK, experts_TK = run(s_TE)
    gates_TK.sum().backward()
    _, _, scales, _ = expected_routing(LOGITS, 1, training=True, seed=SEED)
    finite_difference_TE = torch.zeros(4, 4, dtype=torch.float64)
    step = 1e-6
    for t in range(4):
        for e in range(4):
            shifted = [logits(), logits()]
            shifted[0][t, e] += step
            shifted[1][t, e] -= step
            (up_TK, up_experts), (down_TK, down_experts) = run(shifted[0]), run(shifted[1])
            assert torch.equal(up_experts, experts_TK) and torch.equal(down_experts, experts_TK)
            finite_difference_TE[t, e] = (up_TK[t, 0] - down_TK[t, 0]) / (2 * step)
    scale_T1 = torch.tensor(scales, dtype=torch.float64)
    torch.testing.assert_close(s_TE.grad * scale_T1, finite_difference_TE, atol=1e-8, rtol=1e-6)
    assert (scale_T1 == 1 / 3).any()  # the estimator differs from the derivative there


# ----- (c) shapes, dtypes and the dense routing ------------------------------------------------


@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_routing_contract(topk, dtype):
    gen = torch.Generator().manual_seed(0)
    s_TE = (torch.randn(50, 8, generator=gen) * 0.02 + 1.0).to(dtype).requires_grad_()
    gates_TK, experts_TK = sparsemixer_v2(s_TE, topk=topk, training=True, generator=gen)
    probs_TE, routing_map_TE = dense_routing(gates_TK, experts_TK, 8)
    assert gates_TK.shape == (50, topk) and gates_TK.dtype == dtype
    assert experts_TK.dtype == torch.int64
    assert probs_TE.shape == routing_map_TE.shape == (50, 8)
    assert probs_TE.dtype == dtype and routing_map_TE.dtype == torch.bool
    assert torch.all(routing_map_TE.sum(-1) == topk)  # distinct experts per token
    assert torch.all(probs_TE[~routing_map_TE] == 0) and torch.all(probs_TE[routing_map_TE] > 0)
    for t in range(50):
        for j in range(topk):
            assert probs_TE[t, experts_TK[t, j]] == gates_TK[t, j]
    probs_TE.sum().backward()
    assert s_TE.grad.dtype == dtype and s_TE.grad.abs().sum() > 0


# ----- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(topk=3), "topk"),
        (dict(topk=0), "topk"),
        (dict(jitter_eps=0.0), "jitter_eps"),
        (dict(jitter_eps=-0.1), "jitter_eps"),
        (dict(jitter_eps=float("nan")), "jitter_eps"),
        (dict(jitter_eps=True), "jitter_eps"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        sparsemixer_v2(logits(), **kwargs)


def test_logits_must_be_tokens_by_experts():
    with pytest.raises(ValueError, match="logits_TE"):
        sparsemixer_v2(logits()[None])
    with pytest.raises(ValueError, match="topk=2"):
        sparsemixer_v2(logits()[:, :1], topk=2)
