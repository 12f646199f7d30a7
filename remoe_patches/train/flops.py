"""Model FLOPs of a training step, counted from the experts the routers actually used.

A matrix multiply of an ``m x n`` weight with one token costs ``2mn`` FLOPs forward and twice
that backward, so a trained weight costs ``6mn`` per token. Attention scores add
``6 * 2 * S * h`` per token and layer (QK^T and AV, forward+backward, no causal discount, as
Megatron-LM counts them).
"""

from __future__ import annotations

from remoe_patches.config.model_config import ModelConfig


def training_flops_per_token(model: ModelConfig, active_experts_per_token: float) -> float:
    """FLOPs to train on one token. ``active_experts_per_token`` is ``(1 - sparsity) * E*G``
    for ReLU routing and ``k*G`` for TopK; ignored for dense models."""
    h, ffn = model.hidden_size, model.dense_ffn_hidden_size
    head_dim = h // model.num_attention_heads
    attention_weights = h * (2 * h + 2 * model.num_query_groups * head_dim)
    attention_scores = 2 * model.seq_length * h
    swiglu_per_width = 3 * h
    if model.is_moe:
        mlp = active_experts_per_token * swiglu_per_width * model.expert_ffn_hidden_size
        mlp += model.total_experts * h  # router
    else:
        mlp = swiglu_per_width * ffn
    per_layer = attention_weights + attention_scores + mlp
    logits = h * model.vocab_size
    return 6.0 * (model.num_layers * per_layer + logits)
