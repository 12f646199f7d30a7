"""flops.training_flops_per_token, against a count made here from the built model's weights.

The module's rule: each weight matrix a token passes through costs 6 FLOPs per element (2
forward, 4 backward), and attention scores add ``6 * 2 * S * h`` per token and layer. Here the
matrices are read off megatron's GPTModel (qkv, proj, the MLP or the experts and router, the
output layer; no embedding lookup, no norms), so a wrong width, head count or expert count in
the formula shows.
"""

from __future__ import annotations

import re

import pytest

from remoe_patches.config.model_config import ModelConfig
from remoe_patches.train.flops import training_flops_per_token
from remoe_patches.model.build import build_model

from tiny import TINY_MODEL


def matmul_weights(model):
    """Per layer: attention and MLP weights, one expert's weights, the router's; the logits'."""
    layers = {}
    logits = 0
    for name, param in model.named_parameters():
        if name == "output_layer.weight":
            logits += param.numel()
            continue
        match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if match is None or param.dim() != 2:  # embedding lookup, norms
            continue
        layer = layers.setdefault(int(match.group(1)), dict(dense=0, router=0, experts={}))
        rest = match.group(2)
        expert = re.match(r"mlp\.experts\.local_experts\.(\d+)\.", rest)
        if expert:
            index = int(expert.group(1))
            layer["experts"][index] = layer["experts"].get(index, 0) + param.numel()
        elif rest.startswith("mlp.router."):
            layer["router"] += param.numel()
        else:  # attention projections, the dense MLP
            layer["dense"] += param.numel()
    return layers, logits


def counted_flops(model, cfg: ModelConfig, active_experts: float) -> float:
    layers, logits = matmul_weights(model)
    assert len(layers) == cfg.num_layers
    total = 0.0
    for layer in layers.values():
        per_expert = set(layer["experts"].values())
        assert len(per_expert) <= 1  # experts all of one size
        expert = per_expert.pop() if per_expert else 0
        weights = layer["dense"] + layer["router"] + active_experts * expert
        total += 6 * weights + 6 * 2 * cfg.seq_length * cfg.hidden_size
    return total + 6 * logits


@pytest.mark.parametrize(
    "router, granularity, active",
    [
        ("dense", 1, 0.0),
        ("topk", 1, 1.0),
        ("topk", 2, 2.0),
        ("relu", 1, 1.75),  # (1 - sparsity) * E, fractional
        ("relu", 2, 5.5),
    ],
)
def test_flops_per_token_match_the_weights_a_token_passes_through(
    single_rank, router, granularity, active
):
    """6 x (attention + active experts' + router weights + logits) + 6 x 2Sh per layer."""
    cfg = ModelConfig(router=router, granularity=granularity, **TINY_MODEL)
    built = build_model(cfg, single_rank)
    expected = counted_flops(built.model, cfg, active)
    assert training_flops_per_token(cfg, active) == pytest.approx(expected, rel=1e-12)


def test_each_active_expert_adds_one_experts_weights_in_every_layer(single_rank):
    """The MLP cost is linear in the active experts per token: E*G experts of width ffn/G."""
    cfg = ModelConfig(router="relu", granularity=4, **TINY_MODEL)
    layers, _ = matmul_weights(build_model(cfg, single_rank).model)
    (expert,) = set(layers[0]["experts"].values())
    assert len(layers[0]["experts"]) == 8 * 4
    step = training_flops_per_token(cfg, 3.0) - training_flops_per_token(cfg, 2.0)
    assert step == pytest.approx(6 * cfg.num_layers * expert, rel=1e-12)
    # no expert active: attention, router and logits remain
    assert training_flops_per_token(cfg, 0.0) == pytest.approx(
        counted_flops(build_model(cfg, single_rank).model, cfg, 0.0), rel=1e-12
    )


def test_dense_model_ignores_active_experts_and_scores_grow_with_the_sequence():
    """A dense model has no experts to count; scores add 6*2*h per token and layer per position."""
    dense = ModelConfig(router="dense", **TINY_MODEL)
    assert training_flops_per_token(dense, 0.0) == training_flops_per_token(dense, 7.0)
    longer = ModelConfig(
        router="dense", **{**TINY_MODEL, "seq_length": TINY_MODEL["seq_length"] + 10}
    )
    difference = training_flops_per_token(longer, 0.0) - training_flops_per_token(dense, 0.0)
    assert difference == pytest.approx(
        6 * 2 * 10 * TINY_MODEL["hidden_size"] * TINY_MODEL["num_layers"]
    )


def test_paper_182m_dense_by_hand():
    """The 182M dense backbone (L=12, h=768, 12 heads, 4 KV groups, ffn 3072, V=51200, S=1024)."""
    h, layers, seq, vocab = 768, 12, 1024, 51200
    head_dim = h // 12
    qkv = h * (h + 2 * 4 * head_dim)
    proj = h * h
    swiglu = h * 3072 * 2 + 3072 * h
    per_layer = 6 * (qkv + proj + swiglu) + 6 * 2 * seq * h
    expected = layers * per_layer + 6 * vocab * h
    cfg = ModelConfig.preset("182m", router="dense")
    assert training_flops_per_token(cfg, 0.0) == expected
    # about 6 x (the 182M parameters less the input embedding's 39M), plus the scores
    assert 6 * 130e6 < expected < 6 * 160e6 + layers * 6 * 2 * seq * h
