"""Lory's pure math (``remoe_patches.routing.lory``) against an independent numpy computation.

The merged expert is the routing-weighted sum of the experts' parameters and every token runs
through the FFN with those merged weights (not the weighted sum of the experts' outputs); a
segment is routed from the previous segment's mean, the first one by the chosen rule; no output
depends on a later token (exactly with ``uniform``; within the first segment Lory's own rule
lets it, as the paper does); the gradient is the true one and reaches every expert and the router.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from remoe_patches.routing import lory

from routing_references import np_swiglu_ffn, reference_lory, reference_weights

S, B, H, E, F, L = 12, 2, 6, 4, 5, 4  # 3 segments of 4 tokens per sequence
N = S // L


def random_layer(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=gen, dtype=dtype)
    router = torch.randn(E, H, generator=gen, dtype=dtype)
    fc1 = torch.randn(E, H, 2 * F, generator=gen, dtype=dtype) / H**0.5
    fc2 = torch.randn(E, F, H, generator=gen, dtype=dtype) / F**0.5
    return hidden, router, fc1, fc2


def reference_output_mixture(hidden, weights, fc1, fc2, segment_length):
    """What a token-routing MoE would give: sum_e g_e FFN_e(x), for contrast."""
    x, fc1, fc2 = hidden.detach().numpy(), fc1.detach().numpy(), fc2.detach().numpy()
    width = fc2.shape[1]
    out = np.zeros_like(x)
    for s in range(x.shape[0]):
        for b in range(x.shape[1]):
            g = weights[b, s // segment_length]
            out[s, b] = sum(
                g[e] * np_swiglu_ffn(x[s, b], fc1[e, :, :width], fc1[e, :, width:], fc2[e])
                for e in range(len(g))
            )
    return out


def test_merged_parameters_are_the_weighted_sum_of_the_experts():
    gen = torch.Generator().manual_seed(1)
    weights = torch.softmax(torch.randn(B, N, E, generator=gen, dtype=torch.float64), dim=-1)
    params = torch.randn(E, H, 2 * F, generator=gen, dtype=torch.float64)
    merged = lory.merge_experts(weights, params)
    assert merged.shape == (B, N, H, 2 * F)
    for b in range(B):
        for n in range(N):
            expected = np.zeros((H, 2 * F))
            for e in range(E):
                expected += weights[b, n, e].item() * params[e].numpy()
            np.testing.assert_allclose(merged[b, n].numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("first_segment", lory.FIRST_SEGMENT_RULES)
def test_output_is_the_ffn_with_merged_weights_not_the_mixture_of_expert_outputs(first_segment):
    hidden, router, fc1, fc2 = random_layer()
    out, weights = lory.lory_ffn(hidden, router, fc1, fc2, L, first_segment)
    expected = reference_lory(hidden, router, fc1, fc2, L, first_segment)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)
    # SwiGLU is not linear in its weights: mixing the experts' outputs is a different layer.
    mixture = reference_output_mixture(hidden, weights.numpy(), fc1, fc2, L)
    assert np.abs(out.numpy() - mixture).max() > 0.1 * np.abs(mixture).max()


@pytest.mark.parametrize("first_segment", lory.FIRST_SEGMENT_RULES)
def test_each_segment_is_routed_from_the_previous_segments_mean(first_segment):
    hidden, router, _, _ = random_layer(seed=2)
    weights = lory.lory_routing_weights(hidden, router, L, first_segment)
    assert weights.shape == (B, N, E)
    np.testing.assert_allclose(
        weights.numpy(), reference_weights(hidden, router, L, first_segment), rtol=1e-12
    )
    np.testing.assert_allclose(weights.sum(-1).numpy(), np.ones((B, N)), rtol=1e-12)
    if first_segment == "uniform":
        assert torch.equal(weights[:, 0], torch.full((B, E), 1.0 / E, dtype=weights.dtype))


@pytest.mark.parametrize("first_segment", lory.FIRST_SEGMENT_RULES)
def test_no_output_depends_on_a_later_token(first_segment):
    hidden, router, fc1, fc2 = random_layer(seed=3)
    out, _ = lory.lory_ffn(hidden, router, fc1, fc2, L, first_segment)
    for t in range(S):
        changed = hidden.clone()
        changed[t] += torch.linspace(-3.0, 3.0, H, dtype=hidden.dtype)
        out_changed, _ = lory.lory_ffn(changed, router, fc1, fc2, L, first_segment)
        earlier_unchanged = torch.allclose(out_changed[:t], out[:t], rtol=0, atol=1e-13)
        if first_segment == "own_detached" and 0 < t < L:
            # The paper's rule: the first segment is merged by its own mean, so its earlier
            # tokens see a later token of the same segment through the routing weights.
            assert not earlier_unchanged
        else:
            assert earlier_unchanged, f"an output before position {t} changed"
        assert not torch.allclose(out_changed[t], out[t])


@pytest.mark.parametrize("first_segment", lory.FIRST_SEGMENT_RULES)
def test_later_segments_never_reach_earlier_segments(first_segment):
    hidden, router, fc1, fc2 = random_layer(seed=4)
    out, weights = lory.lory_ffn(hidden, router, fc1, fc2, L, first_segment)
    gen = torch.Generator().manual_seed(5)
    for i in range(N):
        # Everything from segment i + 1 on is replaced: segments 0..i are untouched.
        changed = hidden.clone()
        changed[(i + 1) * L :] = torch.randn(
            S - (i + 1) * L, B, H, generator=gen, dtype=hidden.dtype
        )
        out_changed, _ = lory.lory_ffn(changed, router, fc1, fc2, L, first_segment)
        assert torch.allclose(out_changed[: (i + 1) * L], out[: (i + 1) * L], rtol=0, atol=1e-13)
        # Segment i's own tokens never enter its routing weights (except Lory's first segment).
        changed = hidden.clone()
        changed[i * L : (i + 1) * L] = torch.randn(L, B, H, generator=gen, dtype=hidden.dtype)
        weights_changed = lory.lory_routing_weights(changed, router, L, first_segment)
        own_routing_kept = torch.allclose(weights_changed[:, i], weights[:, i], rtol=0, atol=0)
        assert own_routing_kept == (i > 0 or first_segment == "uniform")
        if i + 1 < N:
            assert not torch.allclose(weights_changed[:, i + 1], weights[:, i + 1])


def test_gradients_are_exact():
    """The strictly causal rule is differentiable everywhere; gradcheck compares with finite
    differences (random directions: ``fast_mode``) for the input, the router and the experts."""
    hidden, router, fc1, fc2 = (t.requires_grad_() for t in random_layer(seed=6))

    def layer(hidden, router, fc1, fc2):
        return lory.lory_ffn(hidden, router, fc1, fc2, L, "uniform")[0]

    assert torch.autograd.gradcheck(layer, (hidden, router, fc1, fc2), fast_mode=True)


@pytest.mark.parametrize("first_segment", lory.FIRST_SEGMENT_RULES)
def test_gradient_reaches_every_expert_and_the_router(first_segment):
    hidden, router, fc1, fc2 = (t.requires_grad_() for t in random_layer(seed=7))
    out, _ = lory.lory_ffn(hidden, router, fc1, fc2, L, first_segment)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(8), dtype=out.dtype)
    (out * probe).sum().backward()
    for e in range(E):
        assert fc1.grad[e].abs().min() > 0, f"expert {e}'s fc1 has entries without gradient"
        assert fc2.grad[e].abs().min() > 0, f"expert {e}'s fc2 has entries without gradient"
        assert router.grad[e].abs().min() > 0, f"router row {e} has entries without gradient"


@pytest.mark.parametrize("first_segment", lory.FIRST_SEGMENT_RULES)
def test_first_segment_routing_carries_no_gradient(first_segment):
    """Both rules: a loss on the first segment alone never trains the router (Lory stops the
    gradient of the first segment's own routing); one on the second segment does."""
    hidden, router, fc1, fc2 = (t.requires_grad_() for t in random_layer(seed=9))
    out, _ = lory.lory_ffn(hidden, router, fc1, fc2, L, first_segment)
    (router_grad_first,) = torch.autograd.grad(out[:L].square().sum(), router, retain_graph=True)
    assert torch.equal(router_grad_first, torch.zeros_like(router))
    (router_grad_second,) = torch.autograd.grad(out[L : 2 * L].square().sum(), router)
    assert router_grad_second.abs().min() > 0


def test_low_precision_input_keeps_float32_routing():
    hidden, router, fc1, fc2 = random_layer(seed=10, dtype=torch.float32)
    out32, weights32 = lory.lory_ffn(hidden, router, fc1, fc2, L)
    out16, weights16 = lory.lory_ffn(*(t.bfloat16() for t in (hidden, router, fc1, fc2)), L)
    assert weights16.dtype == torch.float32 and out16.dtype == torch.bfloat16
    assert torch.allclose(weights16, weights32, atol=2e-2)
    assert torch.allclose(out16.float(), out32, atol=5e-2 * out32.abs().max().item())


def test_bad_segment_length_and_first_segment_rule_are_refused():
    hidden, router, fc1, fc2 = random_layer()
    with pytest.raises(ValueError, match="segment_length=5 does not divide the sequence length 12"):
        lory.segments(hidden, 5)  # (lory_ffn pads a short last segment instead)
    with pytest.raises(ValueError, match="segment_length=0: must be a positive"):
        lory.lory_ffn(hidden, router, fc1, fc2, 0)
    with pytest.raises(ValueError, match="first_segment='previous': choose one of own_detached"):
        lory.lory_ffn(hidden, router, fc1, fc2, L, "previous")
