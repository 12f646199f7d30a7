"""The local fast layers equal the megatron-core layers they replace.

SDPAttention against megatron's DotProductAttention (causal, grouped-query, explicit masks);
GroupedGemmExperts against SequentialMLP, per expert and as a whole ReMoE model whose weights
travel through a megatron distributed checkpoint from one expert layout to the other.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.core import dist_checkpointing
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_config import TransformerConfig

from remoe_patches.model import local_layers
from remoe_patches.config.model_config import ModelConfig
from remoe_patches.model.local_layers import GroupedGemmExperts, SDPAttention

from expert_precision import BF16_TOLERANCE, grouped_experts_bf16_errors
from remoe_patches.model.build import build_model

from tiny import TINY_MODEL


def attention_config(heads=4, groups=2, kv_channels=8):
    return TransformerConfig(
        num_layers=1,
        hidden_size=heads * kv_channels,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=kv_channels,
        attention_dropout=0.0,
        masked_softmax_fusion=False,
    )


def qkv(seq=12, batch=3, heads=4, groups=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(seq, batch, heads, dim), (seq, batch, groups, dim), (seq, batch, groups, dim)]
    return [torch.randn(*shape, generator=gen, requires_grad=True) for shape in shapes]


def grads_of(output, inputs, seed=1):
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((output * upstream).sum(), inputs)


@pytest.mark.parametrize("heads, groups", [(4, 2), (4, 4), (4, 1)])
def test_sdpa_equals_megatron_attention_causal(single_rank, heads, groups):
    config = attention_config(heads, groups)
    reference = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    fast = SDPAttention(config, 1, AttnMaskType.causal, "self")
    inputs = qkv(heads=heads, groups=groups)
    expected, actual = reference(*inputs, None), fast(*inputs, None)
    assert actual.shape == expected.shape == (12, 3, heads * 8)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    for g_fast, g_ref in zip(grads_of(actual, inputs), grads_of(expected, inputs)):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-6)


def test_sdpa_equals_megatron_attention_with_a_mask(single_rank):
    config = attention_config()
    reference = DotProductAttention(config, 1, AttnMaskType.padding, "self")
    fast = SDPAttention(config, 1, AttnMaskType.padding, "self")
    # megatron's convention: True where attention is not allowed
    mask = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(3)) > 0.6
    mask[..., 0] = False  # every query sees at least one key
    inputs = qkv()
    torch.testing.assert_close(fast(*inputs, mask), reference(*inputs, mask), rtol=1e-5, atol=1e-6)


def test_sdpa_scale_and_causality_from_first_principles(single_rank):
    config = attention_config(heads=2, groups=2, kv_channels=4)
    fast = SDPAttention(config, 1, AttnMaskType.causal, "self")
    q, k, v = qkv(seq=5, batch=1, heads=2, groups=2, dim=4)
    out = fast(q, k, v, None).view(5, 1, 2, 4)
    for head in range(2):
        scores = q[:, 0, head] @ k[:, 0, head].T / 2.0  # sqrt(kv_channels = 4)
        scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
        torch.testing.assert_close(out[:, 0, head], scores.softmax(-1) @ v[:, 0, head])


def experts_config(num_experts=4):
    return TransformerConfig(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=4,
        ffn_hidden_size=24,
        moe_ffn_hidden_size=24,
        num_moe_experts=num_experts,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        moe_grouped_gemm=True,
    )


def expert_pair(num_experts=4):
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    config = experts_config(num_experts)
    groups = ProcessGroupCollection.use_mpu_process_groups()
    sequential = SequentialMLP(
        num_experts,
        config,
        MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        pg_collection=groups,
    )
    grouped = GroupedGemmExperts(num_experts, config, pg_collection=groups)
    # GroupedMLP's layout: weight1 viewed [E, h, 2*ffn], weight2 viewed [E, ffn, h], where
    # SequentialMLP's linears hold [2*ffn, h] and [h, ffn] per expert.
    with torch.no_grad():
        w1 = grouped.weight1.view(num_experts, 16, -1)
        w2 = grouped.weight2.view(num_experts, -1, 16)
        for e, expert in enumerate(sequential.local_experts):
            w1[e].copy_(expert.linear_fc1.weight.T)
            w2[e].copy_(expert.linear_fc2.weight.T)
    return sequential, grouped


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 10, 0], [1, 1, 1, 1]])
def test_grouped_experts_equal_sequential_experts(single_rank, counts):
    sequential, grouped = expert_pair()
    gen = torch.Generator().manual_seed(0)
    tokens = sum(counts)
    hidden = torch.randn(tokens, 16, generator=gen, requires_grad=True)
    probs = torch.rand(tokens, generator=gen, requires_grad=True)
    tokens_per_expert = torch.tensor(counts)
    expected, _ = sequential(hidden, tokens_per_expert, probs)
    actual, _ = grouped(hidden, tokens_per_expert, probs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)

    weights_seq = [
        p for e in sequential.local_experts for p in (e.linear_fc1.weight, e.linear_fc2.weight)
    ]
    g_seq = grads_of(expected, [hidden, probs, *weights_seq])
    g_grp = grads_of(actual, [hidden, probs, grouped.weight1, grouped.weight2])
    torch.testing.assert_close(g_grp[0], g_seq[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_grp[1], g_seq[1], rtol=1e-5, atol=1e-6)
    w1_grad = g_grp[2].view(4, 16, -1)
    w2_grad = g_grp[3].view(4, -1, 16)
    for e in range(4):
        torch.testing.assert_close(w1_grad[e].T, g_seq[2 + 2 * e], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w2_grad[e].T, g_seq[3 + 2 * e], rtol=1e-5, atol=1e-6)


def test_grouped_experts_without_tokens_still_give_weight_gradients(single_rank):
    _, grouped = expert_pair()
    hidden = torch.zeros(0, 16, requires_grad=True)
    out, _ = grouped(hidden, torch.zeros(4, dtype=torch.long), torch.zeros(0))
    assert out.shape == (0, 16)
    out.sum().backward()
    assert grouped.weight1.grad is not None and grouped.weight2.grad is not None


def test_remoe_checkpoint_moves_between_expert_layouts(single_rank, tmp_path):
    """A ReMoE model saved with SequentialMLP experts loads into grouped-GEMM experts (and
    back) through megatron's distributed checkpoint, with the same loss and gradients."""
    cfg = ModelConfig(router="relu", **TINY_MODEL)
    sequential = build_model(cfg, single_rank).model
    grouped = build_model(
        ModelConfig(router="relu", moe_grouped_gemm=True, **TINY_MODEL), single_rank
    ).model
    assert any(isinstance(m, GroupedGemmExperts) for m in grouped.modules())
    for name in ("seq", "grp"):
        (tmp_path / name).mkdir()
    dist_checkpointing.save(sequential.sharded_state_dict(), str(tmp_path / "seq"))
    grouped.load_state_dict(
        dist_checkpointing.load(grouped.sharded_state_dict(), str(tmp_path / "seq"))
    )
    dist_checkpointing.save(grouped.sharded_state_dict(), str(tmp_path / "grp"))
    round_trip = build_model(cfg, single_rank).model
    round_trip.load_state_dict(
        dist_checkpointing.load(round_trip.sharded_state_dict(), str(tmp_path / "grp"))
    )

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0, TINY_MODEL["vocab_size"], (2, TINY_MODEL["seq_length"] + 1), generator=gen
    )
    positions = torch.arange(TINY_MODEL["seq_length"]).expand(2, -1)
    losses, embedding_grads = [], []
    for model in (sequential, grouped, round_trip):
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
        loss.backward()
        losses.append(loss.detach())
        embedding_grads.append(model.embedding.word_embeddings.weight.grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(losses[2], losses[0], rtol=0, atol=0)
    torch.testing.assert_close(embedding_grads[1], embedding_grads[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(embedding_grads[2], embedding_grads[0], rtol=0, atol=0)


RAGGED_COUNTS = [30, 0, 7, 64, 1, 0, 12, 9]  # uneven groups, two empty


def test_grouped_experts_in_bf16_match_float64_outputs_and_gradients(single_rank):
    errors = grouped_experts_bf16_errors("cpu", RAGGED_COUNTS)
    assert max(errors.values()) < BF16_TOLERANCE, errors


def test_bf16_expert_check_catches_probabilities_applied_twice(single_rank, monkeypatch):
    """The check the GPU runs (tests_gpu/test_cuda.py) fails on a real bug, here on CPU."""
    swiglu = local_layers._swiglu_with_probs
    monkeypatch.setattr(
        local_layers, "_swiglu_with_probs", lambda fc1, probs: swiglu(fc1, probs) * probs
    )
    errors = grouped_experts_bf16_errors("cpu", RAGGED_COUNTS)
    assert errors["output"] > 10 * BF16_TOLERANCE, errors
