"""Grouped-GEMM experts in bf16 against float64 arithmetic on the same bf16 weights: the output
and all four gradients (tokens, probabilities, both weights), with ragged and empty expert
groups. Shared by the CPU suite (``test_local_layers.py``) and ``tests_gpu/test_cuda.py``.

Errors are relative Frobenius norms, ``|actual - exact| / |exact|``: bf16 rounding gives a few
1e-3 whatever the scale of the values, where an absolute tolerance (2e-2 on outputs of std 0.01,
as before) passed any bug.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from remoe_patches.model.local_layers import GroupedGemmExperts

BF16_TOLERANCE = 2e-2
"""Largest relative error accepted; bf16 rounding measures ~4e-3 (CPU), a wrong formula >> 0.1."""


def exact_experts(hidden_Th, probs_T, w1_Ehf, w2_Efh, counts):
    """The SwiGLU experts in float64, one expert at a time, straight from the formula."""
    outputs, start = [], 0
    for expert, count in enumerate(counts):
        rows = slice(start, start + count)
        gate, up = (hidden_Th[rows] @ w1_Ehf[expert]).chunk(2, dim=-1)
        outputs.append((F.silu(gate) * up * probs_T[rows, None]) @ w2_Efh[expert])
        start += count
    return torch.cat(outputs)


def grouped_experts_bf16_errors(device, counts, hidden=64, ffn=128, seed=0) -> dict:
    """Relative errors of GroupedGemmExperts in bf16 (megatron's parallel state must be up)."""
    experts = len(counts)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=4,
        moe_ffn_hidden_size=ffn,
        num_moe_experts=experts,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        bf16=True,
        params_dtype=torch.bfloat16,
        moe_grouped_gemm=True,
    )
    grouped = GroupedGemmExperts(
        experts, config, pg_collection=ProcessGroupCollection.use_mpu_process_groups()
    )
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():  # weights of the init's scale, drawn here so every device agrees
        for weight in (grouped.weight1, grouped.weight2):
            weight.copy_(0.05 * torch.randn(weight.shape, generator=gen, device=device))
    tokens = sum(counts)
    hidden_Th = torch.randn(tokens, hidden, generator=gen, device=device).bfloat16()
    probs_T = torch.rand(tokens, generator=gen, device=device).bfloat16()
    upstream_Th = torch.randn(tokens, hidden, generator=gen, device=device).bfloat16()

    x, p = hidden_Th.clone().requires_grad_(), probs_T.clone().requires_grad_()
    out, _ = grouped(x, torch.tensor(counts, device=device), p)
    out.backward(upstream_Th)
    actual = dict(
        output=out,
        d_hidden=x.grad,
        d_probs=p.grad,
        d_weight1=grouped.weight1.grad,
        d_weight2=grouped.weight2.grad,
    )

    x64, p64 = (t.double().requires_grad_() for t in (hidden_Th, probs_T))
    w1 = grouped.weight1.detach().double().view(experts, hidden, -1).requires_grad_()
    w2 = grouped.weight2.detach().double().view(experts, -1, hidden).requires_grad_()
    exact_out = exact_experts(x64, p64, w1, w2, counts)
    exact_out.backward(upstream_Th.double())
    exact = dict(
        output=exact_out,
        d_hidden=x64.grad,
        d_probs=p64.grad,
        d_weight1=w1.grad.reshape(grouped.weight1.shape),
        d_weight2=w2.grad.reshape(grouped.weight2.shape),
    )
    return {
        name: float((actual[name].detach().double() - exact[name]).norm() / exact[name].norm())
        for name in exact
    }
